"""benchmarks/forgetting.py: the arms it derives (pure), and a tiny two-arm run of the real flow from a scratch base."""

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest

from mixtune.core.config import validate_config
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("forgetting_bench", ROOT / "benchmarks" / "forgetting.py")
bench = sys.modules["forgetting_bench"] = importlib.util.module_from_spec(spec)  # benchmarks/ is no package
spec.loader.exec_module(bench)


def arm_configs(tmp_path, **sections):
    config = tiny_config(tmp_path, **sections)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")  # what the schema checks a model folder by
    arms = bench.arm_list(config.schedule.stages)
    return config, {a.name: bench.arm_config(config, a, str(base), True, tmp_path) for a in arms}


def test_every_full_sft_arm_trains_the_same_samples_from_the_same_base_with_the_same_validation(tmp_path):
    config, raws = arm_configs(tmp_path)
    assert list(raws) == [
        "domain-only",
        "fixed-30",
        "fixed-50",
        "ramp",
        "lora-ramp",
        "lora-domain-only",
        "self-rehearsal",
        "adaptive",
    ]
    stages = config.schedule.stages
    for name, raw in raws.items():
        if name == "self-rehearsal":  # its own sources: the next test
            continue
        assert raw["schedule"]["stages"] == stages and raw["schedule"]["samples_per_stage"] == 160
        assert raw["model"]["path"] == str(tmp_path / "base") and raw["pretrain"]["enabled"] is False
        assert raw["run"]["name"] == name and raw["run"]["seed"] == config.run.seed
        assert raw["registry"]["skip_unchanged"] is False
        assert raw["data"]["sources"] == raws["ramp"]["data"]["sources"]
        assert raw["tracking"] == raws["ramp"]["tracking"]
        evaluation = {k: raw["validation"][k] for k in ("eval_steps", "first_eval_step", "stop_mid_stage")}
        assert evaluation == {"eval_steps": bench.END_ONLY, "first_eval_step": bench.END_ONLY, "stop_mid_stage": False}
    assert raws["domain-only"]["schedule"]["shares"] == [1.0] * stages
    assert raws["fixed-30"]["schedule"]["shares"] == [0.3] * stages
    assert "shares" not in raws["ramp"]["schedule"] and raws["ramp"]["schedule"]["shape"] == "linear"
    assert raws["adaptive"]["schedule"]["shape"] == "adaptive"
    # the gate is off for the fixed schedules; the adaptive ramp keeps the budget it steers by, and holds
    assert raws["ramp"]["validation"]["forgetting_budget"] == bench.GATE_OFF
    assert raws["adaptive"]["validation"]["forgetting_budget"] == config.validation.forgetting_budget
    assert raws["adaptive"]["validation"]["on_forgetting"] == "hold"
    assert (raws["lora-ramp"]["train"]["method"], raws["lora-ramp"]["train"]["learning_rate"]) == ("lora", 5e-3)
    for raw in raws.values():
        validate_config(raw, "arm", base_dir=tmp_path)  # every arm is a config mixtune accepts


def test_the_self_rehearsal_arm_trains_on_the_domain_source_alone(tmp_path):
    _, raws = arm_configs(tmp_path)
    arm = raws["self-rehearsal"]
    assert arm["data"]["rehearsal"] == "self"
    assert {s["role"] for s in arm["data"]["sources"]} == {"domain"}


def test_a_users_learning_rate_is_kept_for_its_method_and_a_pretrained_base_gets_mixtunes_defaults(tmp_path):
    config = tiny_config(tmp_path, train={"method": "full", "learning_rate": 3e-4})
    assert bench.learning_rate(config, "full", scratch_base=True) == 3e-4
    assert bench.learning_rate(config, "lora", scratch_base=True) == bench.SCRATCH_LR["lora"]
    assert bench.learning_rate(config, "lora", scratch_base=False) is None


def record(arm, domain, general, base=(3.0, 2.0)):
    stage = {"stage": 1, "target": 0.5, "realised": 0.5, "samples": 160, "steps": 10, "decision": "continue"}
    return {
        "arm": arm,
        "method": "full",
        "run_id": arm,
        "base": {"domain": base[0], "general": base[1]},
        "final": {"domain": domain, "general": general},
        "base_tasks": {"src/exact_match": 0.1},
        "final_tasks": {"src/exact_match": 0.2},
        "final_stage": 1,
        "stages": [stage, stage],
        "wall_s": 12.0,
    }


def test_the_table_gives_gain_and_drift_relative_to_the_one_base(tmp_path):
    rows = bench.result_rows([record("domain-only", 1.5, 3.0), record("ramp", 2.4, 2.1)])
    assert rows[0]["domain gain"] == pytest.approx(0.5) and rows[0]["general drift"] == pytest.approx(0.5)
    assert rows[1]["domain gain"] == pytest.approx(0.2) and rows[1]["general drift"] == pytest.approx(0.05)
    assert rows[0]["samples"] == 320 and rows[0]["domain samples"] == 160 and rows[0]["steps"] == 20
    table = bench.markdown_table(rows)
    assert "| domain-only | full | 0.50 0.50 | 20 | 320 | 160 | 1.5000 | 3.0000 | +50.0% | +50.0% | 0.200 |" in table
    assert "general val loss 2.0000, src/exact_match 0.100" in table
    with pytest.raises(ValueError, match="different base losses"):
        bench.markdown_table(bench.result_rows([record("a", 1, 1), record("b", 1, 1, base=(3.0, 2.5))]))


def in_process(args: list[str], log: Path) -> None:
    """`mixtune ARGS` in this process (the session's Prefect server instead of a temporary one per run)."""
    from mixtune.cli import main

    log.parent.mkdir(parents=True, exist_ok=True)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main(args)
    log.write_text(output.getvalue(), encoding="utf-8")
    assert code == 0, output.getvalue()


@pytest.mark.e2e
def test_two_arms_from_one_scratch_base_are_measured_against_the_same_base_losses(prefect_harness, tmp_path):
    config = tiny_config(
        tmp_path / "user",
        schedule={"stages": 2, "samples_per_stage": 64},
        pretrain={"epochs": 1, "max_steps": 10},
    )
    out = tmp_path / "bench"
    result = bench.run_benchmark(config, out, arm_names=["domain-only", "ramp"], base_samples=64, runner=in_process)
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["domain-only", "ramp"]
    assert rows["domain-only"]["base domain"] == rows["ramp"]["base domain"]
    assert rows["domain-only"]["base general"] == rows["ramp"]["base general"]
    assert rows["domain-only"]["shares"] == "1.00 1.00"
    assert [float(s) for s in rows["ramp"]["shares"].split()] == pytest.approx([0.1, 0.5], abs=0.02)
    for row in rows.values():  # equal compute: every step of every stage
        assert (row["samples"], row["steps"]) == (128, 8)
        assert row["domain gain"] == pytest.approx((row["base domain"] - row["domain val"]) / row["base domain"])
        assert row["general drift"] == pytest.approx((row["general val"] - row["base general"]) / row["base general"])
    assert rows["domain-only"]["domain samples"] == 128 and rows["ramp"]["domain samples"] < 64
    table = (out / "table.md").read_text()
    assert "| domain-only | full |" in table and "| ramp | full |" in table
    assert "domain-only-" in result["compare"].read_text() and result["plot"].is_file()


def test_a_failed_arm_is_reported_by_mixtunes_own_message():
    error = (
        "mixtune run /b/configs/self-rehearsal.yaml --fresh failed (exit 2); log /b/logs/self-rehearsal.log:\n"
        "Traceback (most recent call last):\n  ...\n"
        "mixtune: unusable input, nothing was trained:\n"
        "  rehearsal:self: none of the base model's 180 answers is usable (empty_answer 180)\n"
        "01:23:16.003 | INFO    | prefect - Stopping temporary server on http://127.0.0.1:8204\n"
    )
    assert bench.why_failed(error) == (
        "mixtune: unusable input, nothing was trained: "
        "rehearsal:self: none of the base model's 180 answers is usable (empty_answer 180)"
    )
    assert bench.why_failed("mixtune run x failed (exit 1); log l:\nKilled") == "Killed"
