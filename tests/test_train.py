"""A stage interrupted mid-way resumes from its own last checkpoint, in the same MLflow run."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks import lm, tracking
from tasks.base_model import prepare_base, prepare_tokenizer
from tasks.ingest import ingest
from tasks.mix import mix_stage
from tasks.tokenize import tokenize
from tasks.train import train_stage
from tests.conftest import tiny_config


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage")
    config = tiny_config(folder, schedule={"samples_per_stage": 160}, validation={"eval_steps": 4})
    data = ingest(config)
    tokenizer_dir = prepare_tokenizer(config, data.samples, data.key)
    tokens = tokenize(data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir)
    base = prepare_base(config, tokenizer_dir, tokens.pretrain, tokens.key)
    return config, tokens, base


def test_interrupted_stage_resumes_from_its_checkpoint_in_the_same_run(prepared, tmp_path, monkeypatch):
    config, tokens, base = prepared
    import pandas as pd
    sft = pd.read_parquet(tokens.sft)
    mix = mix_stage(sft[sft["split"] == "train"], 1, 0.3, 160, seed=0, manifest=str(tmp_path / "mix.parquet"))
    parent = tracking.start_parent_run(config, "flow-run-under-test")
    original = lm.ProgressCallback.on_step_end

    def crash_once_at_step_6(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == 6 and not getattr(crash_once_at_step_6, "done", False):
            crash_once_at_step_6.done = True
            raise Crash("simulated crash")

    monkeypatch.setattr(lm.ProgressCallback, "on_step_end", crash_once_at_step_6)
    with pytest.raises(Crash):
        train_stage(config, mix, tokens.sft, base, base, str(tmp_path / "stage-1"), parent)
    checkpoints = sorted(p.name for p in (tmp_path / "stage-1" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-4"]
    assert (tmp_path / "stage-1" / "checkpoints" / "checkpoint-4" / "model.safetensors").is_file()

    result = train_stage(config, mix, tokens.sft, base, base, str(tmp_path / "stage-1"), parent)
    assert result.global_step == result.max_steps == 10
    client = MlflowClient(tracking.tracking_uri(config))
    history = client.get_metric_history(result.run_id, "train_loss")
    assert sorted({m.step for m in history}) == [5, 10]  # logging_steps=5: one line from each attempt
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [c.info.run_id for c in children] == [result.run_id]

    again = train_stage(config, mix, tokens.sft, base, base, str(tmp_path / "stage-1"), parent)
    assert again == result  # a finished stage is not trained twice
    assert Path(result.model_dir, "model.safetensors").is_file()
