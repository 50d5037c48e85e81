"""A stage stopped by the forgetting gate before any checkpoint keeps the model it started from and says so
once; a run whose every stage breached delivers its base model, registers nothing and says so everywhere."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from transformers import TrainerControl

import tasks.champion
from flows.finetune import finetune
from mixtune.cli import format_summary, format_verdict
from tasks.callbacks import ForgettingStop, OverfitWatch
from tasks.champion import base_delivered
from tasks.guard import OverfitTracker, kept_model
from tasks.mlflow_names import Tag
from tasks.models import evaluate
from tasks.train import early_stop_reason
from tasks.verdicts import verdict_markdown
from tests.conftest import sft_table, tiny_config
from tests.test_retrain import prefect_verdict


def test_what_a_stage_keeps_is_said_once_and_never_as_none():
    assert kept_model(4, breach_step=6) == "best checkpoint before it (step 4) kept"
    assert kept_model(4) == "best checkpoint (step 4) kept"
    assert kept_model(None, breach_step=5) == "no checkpoint before step 5; the stage keeps the model it started from"
    assert "None" not in kept_model(None)


def stop_reason(tmp_path, general: float, best: str | None, step: int = 5, max_steps: int = 10) -> str | None:
    """The stop reason of a stage whose only evaluation (at `step`) measured `general` against a base of 1.0."""
    forgetting = ForgettingStop(base_general=1.0, budget=0.1)
    state = SimpleNamespace(global_step=step, max_steps=max_steps, best_model_checkpoint=best)
    forgetting.on_evaluate(None, state, TrainerControl(), metrics={"eval_general_loss": general})
    watch = OverfitWatch(OverfitTracker({"domain": 3, "general": 3}, {"domain": 0.0, "general": 0.0}))
    return early_stop_reason(state, watch, forgetting, tiny_config(tmp_path))


def test_a_breach_at_the_first_evaluation_keeps_the_starting_model_and_says_it_once(tmp_path):
    reason = stop_reason(tmp_path, general=1.163, best=None)
    assert reason == (
        "general drift +16.3% at step 5 passed the forgetting budget of 10% (general val loss 1.1630 vs the base "
        "model's 1.0000); no checkpoint before step 5; the stage keeps the model it started from"
    )
    later = stop_reason(tmp_path, general=1.2, best=str(tmp_path / "checkpoint-3"), step=6)
    assert later.endswith("; best checkpoint before it (step 3) kept") and later.count("kept") == 1
    patience = stop_reason(tmp_path, general=1.0, best=str(tmp_path / "checkpoint-2"))  # within budget: no breach
    assert patience == "domain val loss did not improve for 3 evaluations; best checkpoint (step 2) kept"
    assert stop_reason(tmp_path, general=1.0, best=None, step=10) is None  # ran to its last step


def test_the_base_delivered_verdict_says_nothing_is_registered(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.champion, "domain_val_digest", lambda sft_path: "digest")
    holders = {None: "there is still no champion", "3": "the champion is unchanged (version 3)"}
    for holder, champion in holders.items():
        found = SimpleNamespace(version=holder) if holder else None
        monkeypatch.setattr(tasks.champion, "model_for", lambda tracker, name, alias, digest, v=found: (name, v))
        verdict = base_delivered(tiny_config(tmp_path), None, "sft.parquet")
        assert verdict.decision == "no_trained_model" and verdict.version is None
        assert verdict.reason == f"base delivered: no stage passed the forgetting gate; nothing registered, {champion}"
        assert verdict.champion_version == (int(holder) if holder else None)
        assert format_verdict(verdict).startswith(f"retraining: no_trained_model: {verdict.reason}")
        assert "this run's model is version" not in verdict_markdown(verdict)


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_domain_only_that_breaches_at_once_registers_nothing_and_says_so(prefect_harness, tmp_path, caplog):
    """README's domain-only variant at a learning rate that wrecks general ability within a few steps: the stage
    stops at its first evaluation (step 5), before any checkpoint, and the run delivers its base model."""
    config = tiny_config(
        tmp_path,
        run={"keep": "stages"},  # the stage's final is read below; a run that delivers the base keeps none else
        schedule={"shares": [1.0]},
        train={"learning_rate": 0.1, "warmup_ratio": 0.0},
        validation={"eval_steps": 5, "first_eval_step": 5, "forgetting_budget": 0.1, "on_forgetting": "stop"},
    )
    with caplog.at_level(logging.INFO):
        summary = finetune(config)
    [stage] = summary.stages
    assert stage.steps == 5 and stage.best_step is None and stage.gate.decision == "stop"
    assert stage.stop_reason.endswith("; no checkpoint before step 5; the stage keeps the model it started from")
    kept = evaluate(stage.model_dir, stage.model_dir, sft_table(config), config.validation.batch_size)
    assert kept.general == pytest.approx(summary.baseline.general, rel=1e-5)  # not the weights that breached

    printed = format_summary(summary, 1.0)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for text in (printed, logged):
        assert "None" not in text
        assert all(line.count("kept") + line.count("keeps") <= 1 for line in text.splitlines())  # said once
    assert printed.count("the stage keeps the model it started from") == 1
    assert "first trained model" not in printed + logged

    verdict = summary.verdict
    reason = "base delivered: no stage passed the forgetting gate; nothing registered, there is still no champion"
    assert verdict.decision == "no_trained_model" and verdict.reason == reason and verdict.version is None
    assert f"retraining: no_trained_model: {reason}" in printed
    client = MlflowClient(summary.tracking_uri)
    assert client.search_registered_models() == []  # the base is no version, and holds no alias
    tags = client.get_run(summary.parent_run_id).data.tags
    assert tags[Tag.VERDICT] == "no_trained_model" and tags[Tag.VERDICT_REASON] == reason
    assert tags[Tag.MODEL_VERSION] == "" and tags[Tag.FINAL_STAGE] == "0"
    markdown = client.download_artifacts(summary.parent_run_id, "verdict.md", str(tmp_path))
    assert reason in Path(markdown).read_text()
    assert reason in prefect_verdict(tags[Tag.FLOW_RUN])

    again = finetune(config)  # the same seeded inputs would breach the same way: a skip that says why
    assert again.verdict.decision == "skip" and again.verdict.previous_run == summary.parent_run_id
    assert "that run delivered its base model" in again.verdict.reason
    assert client.search_registered_models() == []
