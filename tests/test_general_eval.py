"""role: general_eval: general rows no stage trains on, held out whole; general drift is judged on them."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from transformers import TrainerControl

from mixtune.core.config import validate_config
from tasks.ingest import ingest
from tasks.lm import TokenLossTrainer
from tasks.mix import mix_stage
from tasks.plan import pool_sizes
from tasks.records import TokenLosses
from tasks.train import forgetting_stop
from tests.conftest import tiny_config, tiny_raw_config


def general_eval_file(folder: Path, rows: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "held_apart.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            turns = [
                {"role": "user", "content": f"Please add {i} and {i + 7} for me."},
                {"role": "assistant", "content": f"Adding {i} and {i + 7} gives {2 * i + 7}."},
            ]
            out.write(json.dumps({"messages": turns}) + "\n")
    return path


def with_general_eval(tmp_path: Path, **sections) -> dict:
    raw = tiny_raw_config(tmp_path, **sections)
    raw["data"]["sources"].append({"path": str(general_eval_file(tmp_path / "data")), "role": "general_eval"})
    return raw


def test_a_general_eval_source_is_held_out_whole_and_never_mixed_in(tmp_path):
    config = validate_config(with_general_eval(tmp_path), "test config", base_dir=tmp_path)
    data = ingest(config)
    label = config.data.sources[-1].label
    assert (data.stats[label].val, data.stats[label].train) == (40, 0)  # every row, up to max_val_samples
    assert pool_sizes(data.stats)["general"] == data.stats["synthetic:general"].train
    samples = pd.read_parquet(data.samples, columns=["sample_id", "source", "tag", "split"])
    samples["n_tokens"] = 10
    mix = mix_stage(samples[samples["split"] == "train"], 1, 0.5, 200, 0, str(tmp_path / "mix.parquet"))
    assert label not in mix.source_epochs and label not in set(pd.read_parquet(mix.manifest)["source"])


def test_the_gate_judges_drift_on_the_general_eval_rows_when_there_are_any():
    split_only = TokenLosses(domain=1.0, general=2.0)
    assert split_only.judged_general() == ("general", 2.0)
    assert TokenLosses(domain=1.0, general=2.0, general_eval=3.0).judged_general() == ("general_eval", 3.0)


def test_the_mid_stage_stop_and_the_best_checkpoint_watch_the_general_eval_rows_when_there_are_any(tmp_path):
    base = TokenLosses(domain=1.0, general=1.0, general_eval=2.0)
    stop = forgetting_stop(tiny_config(tmp_path), base)
    assert (stop.watched, stop.base_general) == ("general_eval", 2.0)
    split_within, held_apart_breached = {"eval_general_loss": 1.0}, {"eval_general_eval_loss": 2.4}
    control = TrainerControl()
    stop.on_evaluate(None, SimpleNamespace(global_step=5), control, metrics=split_within | held_apart_breached)
    assert (
        control.should_training_stop and "(general_eval val loss 2.4000 vs the base model's 2.0000)" in stop.stop_reason
    )
    split_only = forgetting_stop(tiny_config(tmp_path), TokenLosses(domain=1.0, general=1.0))
    split_only.on_evaluate(
        None, SimpleNamespace(global_step=5), TrainerControl(), metrics=split_within | held_apart_breached
    )
    assert (
        split_only.watched == "general" and split_only.stop_reason is None
    )  # no general_eval rows: the split, as before

    metrics = {"eval_domain_loss": 0.5, **split_within, **held_apart_breached}
    TokenLossTrainer.add_guarded_loss(
        SimpleNamespace(general_limit=stop.limit, guarded_set="general_eval"), metrics, "eval"
    )
    assert metrics["eval_guarded_domain_loss"] == float("inf")  # a checkpoint past the budget is never restored


@pytest.mark.e2e
def test_general_drift_is_measured_on_rows_of_a_source_the_run_never_trains_on(prefect_harness, tmp_path):
    from flows.finetune import finetune

    raw = with_general_eval(tmp_path, schedule={"stages": 2, "samples_per_stage": 64})
    raw["validation"]["forgetting_budget"] = 10.0
    raw["validation"]["eval_steps"] = 2  # two evaluations in each 4-step stage: a curve, not only its end
    config = validate_config(raw, "test config", base_dir=tmp_path)
    label = config.data.sources[-1].label
    summary = finetune(config)

    assert summary.baseline.general_eval is not None
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id).data.metrics
    assert parent["base_general_eval_val_loss"] == pytest.approx(summary.baseline.general_eval)
    for stage in summary.stages:
        trained_on = set(pd.read_parquet(Path(stage.stage_dir) / "mix.parquet")["source"])
        assert label not in trained_on and "synthetic:general" in trained_on
        drift = stage.losses.general_eval / summary.baseline.general_eval - 1
        assert stage.gate.general_drift == pytest.approx(drift) and "general_eval val loss" in stage.gate.reason
        metrics = client.get_run(stage.run_id).data.metrics
        assert metrics["general_eval_drift"] == pytest.approx(drift)
        assert metrics["general_split_drift"] == pytest.approx(stage.losses.general / summary.baseline.general - 1)
        assert metrics["final_general_eval_val_loss"] == pytest.approx(stage.losses.general_eval)
        watched = [m.step for m in client.get_metric_history(stage.run_id, "general_eval_val_loss")]
        assert len(set(watched)) >= 2  # evaluated during training, where the mid-stage stop watches it
