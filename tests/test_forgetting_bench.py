"""benchmarks/forgetting.py: the arms it derives, its calibration and tables (pure), and a tiny run of the real
flow from a scratch base: calibration, two arms x two seeds."""

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest

from mixtune.core.config import validate_config
from tests.conftest import tiny_config, tiny_raw_config
from tests.test_general_eval import general_eval_file

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("forgetting_bench", ROOT / "benchmarks" / "forgetting.py")
bench = sys.modules["forgetting_bench"] = importlib.util.module_from_spec(spec)  # benchmarks/ is no package
spec.loader.exec_module(bench)


def with_general_eval(tmp_path, **sections):
    raw = tiny_raw_config(tmp_path, **sections)
    raw["data"]["sources"].append({"path": str(general_eval_file(tmp_path / "data")), "role": "general_eval"})
    return validate_config(raw, "test config", base_dir=tmp_path)


def arm_configs(tmp_path, **sections):
    config = with_general_eval(tmp_path, **sections)
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
        "domain-only-interpolate",
        "domain-only-self-distill",
        "adaptive-ceil-100-b5",
        "adaptive",
        "adaptive-ceil-100",
    ]
    stages = config.schedule.stages
    for name, raw in raws.items():
        if name == "self-rehearsal":  # its own sources: the next test
            continue
        assert raw["schedule"]["stages"] == stages and raw["schedule"]["samples_per_stage"] == 160
        assert raw["model"]["path"] == str(tmp_path / "base") and raw["pretrain"]["enabled"] is False
        assert raw["run"]["name"] == f"config-{name}-s0" and raw["run"]["seed"] == config.run.seed
        assert raw["schedule"]["seed"] == 0 and raw["tracking"]["experiment"] == "forgetting-config"
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
    assert raws["adaptive"]["schedule"]["end"] == 0.5 and raws["adaptive-ceil-100"]["schedule"]["end"] == 1.0
    assert raws["adaptive-ceil-100"]["validation"]["forgetting_budget"] == config.validation.forgetting_budget
    assert raws["adaptive-ceil-100-b5"]["validation"]["forgetting_budget"] == 0.05
    assert (raws["lora-ramp"]["train"]["method"], raws["lora-ramp"]["train"]["learning_rate"]) == ("lora", 5e-3)
    for raw in raws.values():
        validate_config(raw, "arm", base_dir=tmp_path)  # every arm is a config mixtune accepts


def test_the_self_rehearsal_arm_trains_on_the_domain_source_alone_and_is_measured_on_general_eval(tmp_path):
    _, raws = arm_configs(tmp_path)
    arm = raws["self-rehearsal"]
    assert arm["data"]["rehearsal"] == "self"
    assert {s["role"] for s in arm["data"]["sources"]} == {"domain", "general_eval"}


def test_the_interpolation_arm_is_domain_only_under_the_real_budget_and_delivers_by_interpolation(tmp_path):
    config, raws = arm_configs(tmp_path)
    arm, plain = raws["domain-only-interpolate"], raws["domain-only"]
    assert arm["validation"]["interpolate"] == "auto" and plain["validation"]["interpolate"] == "off"
    assert arm["validation"]["forgetting_budget"] == config.validation.forgetting_budget  # not GATE_OFF
    assert arm["schedule"] == plain["schedule"] and arm["data"] == plain["data"] and arm["train"] == plain["train"]
    assert validate_config(arm, "arm", base_dir=tmp_path).validation.interpolate == "auto"


def test_the_self_distill_arm_is_domain_only_on_the_base_models_rewrites(tmp_path):
    _, raws = arm_configs(tmp_path)
    arm, plain = raws["domain-only-self-distill"], raws["domain-only"]
    assert arm["data"] == {**plain["data"], "self_distill": True} and not plain["data"].get("self_distill")
    assert arm["schedule"] == plain["schedule"] and arm["validation"] == plain["validation"]
    assert validate_config(arm, "arm", base_dir=tmp_path).data.self_distill is True


def test_a_seed_and_the_calibrated_compute_reach_the_full_sft_arms_only(tmp_path):
    config = with_general_eval(tmp_path)
    setting = bench.Setting("far", 2, 512, 3e-3)
    arms = {a.name: a for a in bench.arm_list(3)}
    full = bench.arm_config(config, arms["ramp"], str(tmp_path), True, tmp_path, setting)
    lora = bench.arm_config(config, arms["lora-ramp"], str(tmp_path), True, tmp_path, setting)
    assert (full["run"]["name"], full["schedule"]["seed"], full["run"]["seed"]) == ("far-ramp-s2", 2, 0)
    assert full["schedule"]["samples_per_stage"] == lora["schedule"]["samples_per_stage"] == 512
    assert (full["train"]["learning_rate"], lora["train"]["learning_rate"]) == (3e-3, bench.SCRATCH_LR["lora"])


def test_calibration_raises_samples_then_the_rate_and_stops_at_the_stated_drift():
    rungs = bench.ladder(64, (1e-3, 4e-3), 2)
    assert [(r.samples_per_stage, r.learning_rate) for r in rungs] == [
        (64, 1e-3),
        (128, 1e-3),
        (256, 1e-3),
        (256, pytest.approx(2e-3)),
        (256, pytest.approx(4e-3)),
    ]
    drifts, asked = [-0.01, 0.02, 0.049, 0.061, 0.2], []
    found = bench.calibrate(rungs, lambda number, rung: asked.append(number) or drifts[number], 0.05)
    assert found.reached and found.chosen == rungs[3] and asked == [0, 1, 2, 3]  # the top rung never ran
    assert "256 samples per stage at learning rate 2.0e-03: drift +6.1%" in found.text()
    assert "chosen: 256 samples per stage at learning rate 2.0e-03 (the first to reach +5.0%)" in found.text()
    never = bench.calibrate(rungs, lambda number, rung: 0.01, 0.05)
    assert not never.reached and never.chosen == rungs[-1] and len(never.tried) == 5
    assert "none reached +5.0%" in never.text()


def test_a_users_learning_rate_is_kept_for_its_method_and_a_pretrained_base_gets_mixtunes_defaults(tmp_path):
    config = tiny_config(tmp_path, train={"method": "full", "learning_rate": 3e-4})
    assert bench.learning_rate(config, "full", scratch_base=True) == 3e-4
    assert bench.learning_rate(config, "lora", scratch_base=True) == bench.SCRATCH_LR["lora"]
    assert bench.learning_rate(config, "lora", scratch_base=False) is None


def record(arm, domain, general, base=(3.0, 2.0), seed=0):
    stage = {"stage": 1, "target": 0.5, "realised": 0.5, "samples": 160, "steps": 10, "decision": "continue"}
    return {
        "arm": arm,
        "seed": seed,
        "method": "full",
        "run_id": arm,
        "base": {"domain": base[0], "general": 1.0, "general_eval": base[1]},
        "final": {"domain": domain, "general": 0.9, "general_eval": general},
        "said": {"stopped_early": 0.5},
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
    assert rows[0]["split drift"] == pytest.approx(-0.1)  # the general sources' own split: a mix trains on it
    table = bench.markdown_table(rows)
    row = "| domain-only | 0 | full | 0.50 0.50 | 20 | 320 | 160 | 1.5000 | 3.0000 | +50.0% | +50.0% | -10.0% | 50% |"
    assert row + " 0.200 |" in table
    assert "general_eval val loss 2.0000, src/exact_match 0.100" in table
    with pytest.raises(ValueError, match="different base losses"):
        bench.markdown_table(bench.result_rows([record("a", 1, 1), record("b", 1, 1, base=(3.0, 2.5))]))


def test_each_arm_gets_its_mean_and_spread_over_seeds_and_a_point_per_seed_in_the_pareto_plot(tmp_path):
    records = [record("ramp", 2.4, 2.1, seed=0), record("ramp", 2.1, 2.3, seed=1), record("fixed-30", 2.7, 2.0)]
    summaries = bench.arm_summaries(bench.result_rows(records))
    ramp = summaries[0]
    assert (ramp["arm"], ramp["seeds"]) == ("ramp", 2)
    assert ramp["domain gain"] == pytest.approx((0.25, 0.0707107), abs=1e-6)  # gains 0.2 and 0.3
    assert ramp["general drift"] == pytest.approx((0.1, 0.0707107), abs=1e-6)  # drifts 0.05 and 0.15
    assert summaries[1]["general drift"] == (pytest.approx(0.0), 0.0)
    table = bench.summary_table(summaries, budget=0.08)
    assert "| ramp | full | 2 | 20 | +25.0% ± 7.1% | +10.0% ± 7.1% | -10.0% ± 0.0% | no |" in table
    assert "| fixed-30 | full | 1 | 20 | +10.0% ± 0.0% | +0.0% ± 0.0% | -10.0% ± 0.0% | yes |" in table
    plot = bench.pareto_plot(bench.result_rows(records), 0.08, "near", tmp_path / "pareto.png")
    assert plot.stat().st_size > 10_000


def test_the_default_general_sources_are_split_into_training_and_general_eval_rows(tmp_path):
    source = tmp_path / "g.jsonl"
    source.write_text("".join(f'{{"n": {i}}}\n' for i in range(10)))
    train, held = bench.split_general(source, tmp_path / "data")
    assert held.read_text().splitlines() == ['{"n": 0}', '{"n": 4}', '{"n": 8}']
    assert len(train.read_text().splitlines()) == 7
    with pytest.raises(SystemExit, match="role general_eval"):
        bench.require_general_eval(tiny_config(tmp_path))


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
def test_calibration_then_two_arms_by_two_seeds_from_one_scratch_base_against_the_same_base_losses(
    prefect_harness, tmp_path
):
    config = with_general_eval(
        tmp_path / "user",
        schedule={"stages": 2, "samples_per_stage": 64},
        pretrain={"epochs": 1, "max_steps": 10},
    )
    out = tmp_path / "bench"
    result = bench.run_benchmark(
        config,
        out,
        arm_names=["domain-only", "ramp"],
        base_samples=64,
        runner=in_process,
        seeds=2,
        calibration=(-1.0, 0),  # any drift reaches it: the first rung, measured by a real run, is chosen
    )
    measured = result["domains"]["config"]
    found = measured["calibration"]
    assert found.reached and found.chosen == bench.Rung(64, bench.SCRATCH_LR["full"]) and len(found.tried) == 1
    by_seed = [r for r in measured["rows"] if r["seed"] == 1]
    assert [r["arm"] for r in measured["rows"]] == ["domain-only", "domain-only", "ramp", "ramp"]
    assert by_seed[0]["shares"] == "1.00 1.00" and by_seed[0]["domain val"] != measured["rows"][0]["domain val"]
    rows = {r["arm"]: r for r in measured["rows"] if r["seed"] == 0}
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
    assert "| domain-only | full | 2 |" in table and "| ramp | 1 | full |" in table and "Calibration" in table
    assert "config-domain-only-s1" in (out / "compare-config.txt").read_text() and measured["plot"].is_file()


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
