"""A stage interrupted mid-way resumes from its own last checkpoint, in the same MLflow run."""

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks import callbacks, lm, tracking
from tasks.mix import mix_stage
from tasks.train import train_stage
from tests.conftest import ready_mlflow, tiny_config
from tests.records import stage_request

pytestmark = pytest.mark.e2e  # real training of a stage from a pre-trained base


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_base, mlflow_template):
    folder = ready_mlflow(tmp_path_factory.mktemp("stage"), mlflow_template)
    config = tiny_config(folder, schedule={"samples_per_stage": 160}, validation={"eval_steps": 4})
    return config, *tiny_base


def record_batches(monkeypatch) -> list:
    """Every training batch's sample sequences, in the order the optimiser sees them."""
    seen, original = [], lm.TokenLossTrainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        seen.append([tuple(row[row != 0].tolist()) for row in inputs["input_ids"]])
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(lm.TokenLossTrainer, "training_step", recording_step)
    return seen


def crash_once_at(monkeypatch, step: int) -> None:
    original = callbacks.ProgressCallback.on_step_end
    state_of_crash = {"done": False}

    def on_step_end(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == step and not state_of_crash["done"]:
            state_of_crash["done"] = True
            raise Crash("simulated crash")

    monkeypatch.setattr(callbacks.ProgressCallback, "on_step_end", on_step_end)


def stage_mix(tokens, folder):
    sft = pd.read_parquet(tokens.sft)
    return mix_stage(sft[sft["split"] == "train"], 1, 0.3, 160, seed=0, manifest=str(folder / "mix.parquet"))


def test_interrupted_stage_resumes_the_same_sequence_in_the_same_run(prepared, tmp_path, monkeypatch):
    config, tokens, base = prepared
    mix = stage_mix(tokens, tmp_path)
    seen = record_batches(monkeypatch)
    straight_run = tracking.start_parent_run(config, "flow-straight").open_stage(1, "full")
    uninterrupted = train_stage(stage_request(config, mix, tokens, base, tmp_path / "straight", straight_run))
    straight, seen[:] = list(seen), []

    parent = tracking.start_parent_run(config, "flow-crash")
    crash_once_at(monkeypatch, 6)
    with pytest.raises(Crash):
        train_stage(stage_request(config, mix, tokens, base, tmp_path / "stage-1", parent.open_stage(1, "full")))
    checkpoint = tmp_path / "stage-1" / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint-4"]
    assert (checkpoint / "model.safetensors").is_file()
    assert json.loads((checkpoint / "sampler.json").read_text())["samples_consumed"] == 4 * 16
    first_try, seen[:] = list(seen), []

    result = train_stage(stage_request(config, mix, tokens, base, tmp_path / "stage-1", parent.open_stage(1, "full")))
    assert first_try[:4] + seen == straight  # the same samples in the same order as without the crash
    assert result.global_step == result.max_steps == uninterrupted.global_step == 10
    client = MlflowClient(parent.uri)
    history = client.get_metric_history(result.run_id, "train_loss")
    assert sorted({m.step for m in history}) == [5, 10]  # logging_steps=5: one line from each attempt
    exp_id = client.get_run(parent.parent_run_id).info.experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.parent_run_id}'")
    assert [c.info.run_id for c in children] == [result.run_id]

    again = train_stage(stage_request(config, mix, tokens, base, tmp_path / "stage-1", parent.open_stage(1, "full")))
    assert again == result  # a finished stage is not trained twice
    assert Path(result.model_dir, "model.safetensors").is_file()


def test_a_resumed_stage_logs_the_slopes_of_an_uninterrupted_one(prepared, tmp_path, monkeypatch):
    config, tokens, base = prepared
    config = config.model_copy(update={"train": config.train.model_copy(update={"logging_steps": 2})})
    mix = stage_mix(tokens, tmp_path)
    straight = tracking.start_parent_run(config, "flow-slopes-straight").open_stage(1, "full")
    train_stage(stage_request(config, mix, tokens, base, tmp_path / "straight", straight))
    resumed = tracking.start_parent_run(config, "flow-slopes-resumed").open_stage(1, "full")
    crash_once_at(monkeypatch, 6)  # after the evaluation and checkpoint at step 4: the retry resumes there
    with pytest.raises(Crash):
        train_stage(stage_request(config, mix, tokens, base, tmp_path / "resumed", resumed))
    train_stage(stage_request(config, mix, tokens, base, tmp_path / "resumed", resumed))
    client = MlflowClient(straight.uri)
    for name in ("domain_val_slope", "general_val_slope"):  # evaluations at 4, 8 and 10: a slope at 8 and 10
        expected = sorted((m.step, m.value) for m in client.get_metric_history(straight.run_id, name))
        got = sorted((m.step, m.value) for m in client.get_metric_history(resumed.run_id, name))
        assert [step for step, _ in expected] == [8, 10] and [step for step, _ in got] == [8, 10], name
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6), name


def test_resume_refuses_a_checkpoint_of_another_mix(prepared, tmp_path, monkeypatch):
    config, tokens, base = prepared
    mix = stage_mix(tokens, tmp_path)
    stage_run = tracking.start_parent_run(config, "flow-other-mix").open_stage(1, "full")
    crash_once_at(monkeypatch, 6)
    with pytest.raises(Crash):
        train_stage(stage_request(config, mix, tokens, base, tmp_path / "stage-1", stage_run))
    sft = pd.read_parquet(tokens.sft)
    other = mix_stage(sft[sft["split"] == "train"], 1, 0.5, 160, seed=0, manifest=mix.manifest)
    with pytest.raises(RuntimeError, match="another mix manifest"):
        train_stage(stage_request(config, other, tokens, base, tmp_path / "stage-1", stage_run))


def test_lora_adapters_start_from_the_same_weights_for_the_same_seed(prepared):
    import torch

    from tasks.train import load_for_training

    config, _, base = prepared
    lora = config.model_copy(update={"train": config.train.model_copy(update={"method": "lora"})})
    torch.manual_seed(1)
    first = {k: v.clone() for k, v in load_for_training(lora, base, base).named_parameters() if "lora_" in k}
    torch.manual_seed(2)  # whatever ran before must not matter
    second = dict(load_for_training(lora, base, base).named_parameters())
    assert first and all(torch.equal(value, second[name]) for name, value in first.items())
