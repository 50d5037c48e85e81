"""A stage whose general drift passes the forgetting budget mid-stage stops at that evaluation and keeps its
best checkpoint from before the breach: in one stage, and in the whole flow."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.finetune import finetune
from tasks import tracking
from tasks.base_model import prepare_base, prepare_tokenizer
from tasks.ingest import ingest
from tasks.mix import mix_stage
from tasks.mlflow_names import Tag
from tasks.models import evaluate
from tasks.records import StageTraining, TokenLosses
from tasks.tokenize import tokenize
from tasks.train import train_stage
from tests.conftest import ready_mlflow, sft_table, share_cache, tiny_config
from tests.records import stage_request

pytestmark = pytest.mark.e2e  # real training of a stage from a pre-trained base, and the flow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, session_cache, mlflow_template):
    folder = ready_mlflow(share_cache(tmp_path_factory.mktemp("forgetting"), session_cache), mlflow_template)
    config = tiny_config(
        folder,
        pretrain={"epochs": 4},
        train={"learning_rate": 3e-2},
        validation={"eval_steps": 2, "first_eval_step": 1, "patience": 5, "general_patience": 20},
    )
    data = ingest(config)
    tokenizer_dir = prepare_tokenizer(config, data.samples, data.key)
    tokens = tokenize(data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir)
    base = prepare_base(config, tokenizer_dir, tokens.pretrain, tokens.key)
    sft = pd.read_parquet(tokens.sft)
    mix = mix_stage(sft[sft["split"] == "train"], 1, 1.0, 160, seed=0, manifest=str(folder / "mix.parquet"))
    return config, tokens, base, mix


def general_curve(config, tmp_path, prepared_data, name: str, base_general=None):
    config, tokens, base, mix = prepared_data
    stage_run = tracking.start_parent_run(config, f"flow-{name}").open_stage(1, "full")
    # Training reads the baseline's general loss only: its domain loss here is a placeholder.
    baseline = None if base_general is None else TokenLosses(domain=1.0, general=base_general)
    result = train_stage(stage_request(config, mix, tokens, base, tmp_path / name, stage_run, baseline))
    history = MlflowClient(stage_run.uri).get_metric_history(result.run_id, "general_val_loss")
    return result, [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


def test_general_drift_past_the_budget_stops_the_stage_and_keeps_the_checkpoint_before(prepared, tmp_path):
    config, tokens, base, _ = prepared
    free, curve = general_curve(config, tmp_path, prepared, "free")
    assert free.stop_reason is None and curve[0][0] == 1  # the first evaluation comes after one step
    # The first evaluation whose general loss rises over all before it: put the budget's limit just below it.
    rises = [j for j in range(1, len(curve)) if curve[j][1] > max(v for _, v in curve[:j]) + 1e-3]
    assert rises, f"domain-only training at 3e-2 should raise general loss: {curve}"
    j = rises[0]
    limit = (max(v for _, v in curve[:j]) + curve[j][1]) / 2
    base_general = limit / (1 + config.validation.forgetting_budget)

    guarded, guarded_curve = general_curve(config, tmp_path, prepared, "guarded", base_general)
    breach_step = curve[j][0]
    assert guarded_curve == curve[: j + 1]  # the same training up to the breach, then no more
    assert guarded.global_step == breach_step < free.global_step
    assert guarded.best_step is not None and guarded.best_step < breach_step
    assert "passed the forgetting budget" in guarded.stop_reason
    assert f"step {guarded.best_step}" in guarded.stop_reason
    kept = evaluate(guarded.model_dir, base, tokens.sft, config.validation.batch_size)
    assert kept.general <= limit
    assert kept.general == pytest.approx(dict(curve)[guarded.best_step], rel=1e-4)


@pytest.mark.usefixtures("shared_cache", "mlflow_db")  # the pre-training of `prepared` above
def test_the_flow_stops_a_stage_at_the_breach_and_keeps_the_checkpoint_before(prefect_harness, tmp_path):
    """Domain-only at a high rate drifts past a tight budget within a few evaluations, on any machine: the stage
    ends at the first evaluation past it, not at its planned last step, and keeps the checkpoint before."""
    budget = 0.05
    config = tiny_config(
        tmp_path,
        run={"keep": "stages"},  # the stopped stage's final is read below, whichever model the run delivers
        pretrain={"epochs": 4},
        train={"learning_rate": 3e-2},
        schedule={"shares": [1.0], "samples_per_stage": 160},
        validation={
            "eval_steps": 2,
            "first_eval_step": 1,
            "patience": 5,
            "general_patience": 20,
            "forgetting_budget": budget,
            "on_forgetting": "stop",
        },
    )
    summary = finetune(config)
    [stage] = summary.stages
    trained = StageTraining.model_validate_json((Path(stage.stage_dir) / "training.json").read_text())
    client = MlflowClient(summary.tracking_uri)
    curve = sorted((m.step, m.value) for m in client.get_metric_history(stage.run_id, "general_val_loss"))
    limit = summary.baseline.general * (1 + budget)
    breach = next(step for step, value in curve if value > limit)
    assert trained.global_step == breach < trained.max_steps  # stopped at the breach, before its planned steps
    assert curve[-1][0] == breach  # and evaluated nothing after it
    assert trained.best_step is not None and trained.best_step < breach
    kept = evaluate(stage.model_dir, stage.model_dir, sft_table(config), config.validation.batch_size)
    assert kept.general <= limit
    assert kept.general == pytest.approx(dict(curve)[trained.best_step], rel=1e-4)
    assert "passed the forgetting budget" in stage.stop_reason and f"step {trained.best_step}" in stage.stop_reason
    assert stage.gate.decision == "stop" and stage.gate.general_drift > budget  # judged on the breach
    tags = client.get_run(stage.run_id).data.tags
    assert tags[Tag.DECISION] == "stop" and f"{stage.gate.general_drift:+.1%}" in tags[Tag.DECISION_REASON]
    assert summary.final_stage == 0  # a stage that breached is never the final model
    assert client.get_run(summary.parent_run_id).data.tags[Tag.STOPPED_REASON] == stage.gate.reason
