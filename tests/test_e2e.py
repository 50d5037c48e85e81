"""The real flow on a tiny config: ephemeral Prefect server, SQLite MLflow, a 2-layer model on CPU."""

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.finetune import finetune
from tasks.lm import PadCollator, mean_token_loss
from tasks.mlflow_names import Metric, Tag
from tasks.schedule import stage_shares
from tasks.tables import validation_sets
from tests.conftest import sft_table, tiny_config

pytestmark = pytest.mark.e2e
STEP_METRICS = {
    "train_loss",
    "learning_rate",
    "domain_val_loss",
    "general_val_loss",
    "realised_domain_share",
    "tokens_per_second",
    "domain_epochs",
    "general_epochs",
    "epochs/synthetic_domain",
}
CACHED_TASKS = {"ingest", "tokenizer", "tokenize", "pretrain"}


def stage_runs(client: MlflowClient, parent_id: str) -> dict[int, object]:
    exp_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {int(r.data.tags[Tag.STAGE]): r for r in runs}


def reload_losses(model_dir: str, sft_path: Path) -> dict[str, float]:
    if (Path(model_dir) / "adapter_config.json").is_file():
        base_dir = json.loads((Path(model_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    collator = PadCollator(AutoTokenizer.from_pretrained(model_dir).pad_token_id)
    sets = validation_sets(str(sft_path))
    return {tag: mean_token_loss(model, data, collator, batch_size=7) for tag, data in sets.items()}


def check_run(config, summary) -> dict[int, object]:
    client = MlflowClient(summary.tracking_uri)
    children = stage_runs(client, summary.parent_run_id)
    shares = stage_shares(config.schedule)
    assert sorted(children) == list(range(1, len(shares) + 1))
    for stage, run in children.items():
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) >= STEP_METRICS, STEP_METRICS - set(run.data.metrics)
        assert run.data.params["method"] == config.train.method
        assert abs(run.data.metrics["realised_domain_share"] - shares[stage - 1]) <= 0.01
        assert len(client.get_metric_history(run.info.run_id, "domain_val_loss")) >= 2  # every N steps + end
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"mix", "adapter" if config.train.method == "lora" else "model"} <= artifacts
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"base_domain_val_loss", "base_general_val_loss", "cumulative_epochs/synthetic_domain"} <= set(
        parent.data.metrics
    )
    assert "data" in {a.path for a in client.list_artifacts(summary.parent_run_id)}
    return children


@pytest.mark.parametrize("method", ["full", "lora"])
def test_flow_runs_every_stage_and_reloads_to_the_logged_loss(prefect_harness, tmp_path, request, method):
    if method == "lora":  # full builds every cache entry itself (their permissions are checked below)
        request.getfixturevalue("shared_cache"), request.getfixturevalue("mlflow_db")
    train = {"method": method, "learning_rate": 5e-3 if method == "lora" else 1e-3}
    config = tiny_config(tmp_path, train=train, validation={"forgetting_budget": 10.0})
    summary = finetune(config)
    children = check_run(config, summary)
    assert summary.final_stage == len(children)
    shared = [p for p in Path(config.run.output_dir).rglob("*") if p.stat().st_mode & 0o077]
    assert shared == [] and list(Path(config.run.output_dir).rglob("mlflow.db"))  # owner-only, database included
    final = children[summary.final_stage]
    losses = reload_losses(summary.final_model, sft_table(config))
    assert losses["domain"] == pytest.approx(final.data.metrics[Metric.FINAL_DOMAIN_VAL_LOSS], rel=1e-5)
    assert losses["general"] == pytest.approx(final.data.metrics[Metric.FINAL_GENERAL_VAL_LOSS], rel=1e-5)
    kind = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (Path(summary.final_model) / kind).is_file()
    assert not list(Path(summary.final_model).glob("*.bin"))


@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_second_run_reuses_ingest_and_pretraining(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = tiny_config(tmp_path, schedule={"stages": 2, "samples_per_stage": 80}, registry={"skip_unchanged": False})
    first, second = finetune(config), finetune(config)
    client = MlflowClient(second.tracking_uri)
    assert sorted(stage_runs(client, first.parent_run_id)) == sorted(stage_runs(client, second.parent_run_id))
    flow_run_id = client.get_run(second.parent_run_id).data.tags[Tag.FLOW_RUN]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states = {run.name: run.state.name for run in task_runs}
    assert {states[name] for name in CACHED_TASKS} == {"Cached"}, states
    # Stage tasks are named by stage and share (`train stage 1 (share 0.10)`), the others by what they do, with
    # no random suffix (Prefect's default `ingest-a3f`).
    assert {states["train stage 1 (share 0.10)"], states["train stage 2 (share 0.50)"]} == {"Completed"}
    assert {"baseline (base model)", "data report", "publish", "challenge", "crown"} <= set(states)
    assert [name for name in states if re.search(r"-[0-9a-f]{3}$", name)] == []


@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_forgetting_guard_stops_and_keeps_the_model_before_the_breach(prefect_harness, tmp_path):
    # A base with some general ability to lose: longer pre-training than the other tiny runs.
    config = tiny_config(
        tmp_path,
        pretrain={"epochs": 8},
        train={"learning_rate": 1e-3},
        schedule={"shares": [0.0, 1.0, 1.0], "samples_per_stage": 240},
        validation={"forgetting_budget": 0.15, "on_forgetting": "stop"},
    )
    summary = finetune(config)
    # Which full-domain stage breaches first depends on the batch order (train.batching); the first one to breach
    # stops the run, and the stage before it is delivered.
    decisions = [r.gate.decision for r in summary.stages]
    assert decisions[-1] == "stop" and set(decisions[:-1]) == {"continue"} and len(decisions) >= 2
    breach, kept = summary.stages[-1], summary.stages[-2]
    assert breach.gate.general_drift > 0.15
    client = MlflowClient(summary.tracking_uri)
    runs = stage_runs(client, summary.parent_run_id)
    assert sorted(runs) == list(range(1, breach.stage + 1))
    tags, metrics = runs[breach.stage].data.tags, runs[breach.stage].data.metrics
    assert tags[Tag.DECISION] == "stop"
    judged = breach.losses.general if breach.stop_reason is None else breach.gate.general_drift
    if breach.stop_reason is None:  # the breach came at the end of the stage
        assert f"{judged:.4f}" in tags[Tag.DECISION_REASON]
    else:  # the stage stopped at the breach, keeping its checkpoint from before; the gate judges the breach
        assert "passed the forgetting budget" in breach.stop_reason
        assert f"{judged:+.1%}" in tags[Tag.DECISION_REASON]
    assert f"{summary.baseline.general:.4f}" in tags[Tag.DECISION_REASON]
    assert metrics["general_drift"] == pytest.approx(breach.gate.general_drift)
    assert summary.final_stage == kept.stage and summary.final_model == kept.model_dir
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags[Tag.FINAL_STAGE] == str(kept.stage)
    assert "stop" in parent.data.tags[Tag.STOPPED_REASON] or "budget" in parent.data.tags[Tag.STOPPED_REASON]
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"final_model", "plots", "probes", "plan"} <= artifacts
    plots = {a.path for a in client.list_artifacts(summary.parent_run_id, "plots")}
    assert plots == {"plots/domain_share.png", "plots/loss_curves.png"}
