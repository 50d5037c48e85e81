"""Retraining semantics: skip unchanged inputs, challenger vs champion, the registry alias, failure hygiene."""

import os

import pytest
from mlflow.tracking import MlflowClient
from prefect import task

import flows.finetune
from flows.finetune import finetune
from mixtune.compare import compare, comparison, pipeline_runs
from tasks.champion import decide
from tasks.inputs import skip_if_unchanged
from tasks.mlflow_names import Tag
from tasks.models import evaluate
from tasks.records import ByteLosses
from tasks.scoring import nats_per_byte, target_counts
from tests.conftest import sft_table, tiny_config

FAST = {"schedule": {"stages": 2, "samples_per_stage": 80}}


def champion_of(client: MlflowClient, name: str) -> int:
    return int(client.get_model_version_by_alias(name, "champion").version)


def prefect_verdict(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["retrain-verdict"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return artifact.data


def test_decide_first_promote_and_the_two_rejections():
    assert decide(ByteLosses(domain=1.0, general=1.0), None, 0.1, 0.0)[0] == "first"
    champion = ByteLosses(domain=2.0, general=1.0)
    assert decide(ByteLosses(domain=1.9, general=1.05), champion, 0.1, 0.0)[0] == "promote"
    worse, reason = decide(ByteLosses(domain=2.1, general=1.0), champion, 0.1, 0.0)
    assert worse == "reject" and "domain loss not lower" in reason
    forgot, reason = decide(ByteLosses(domain=1.5, general=1.2), champion, 0.1, 0.0)
    assert forgot == "reject" and "forgetting budget" in reason
    assert decide(ByteLosses(domain=1.9, general=1.0), champion, 0.1, 0.1)[0] == "reject"  # 5% < 10% required


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_retraining_first_champion_then_skip_then_a_decision_the_alias_follows(prefect_harness, tmp_path):
    config = tiny_config(tmp_path, **FAST)
    first = finetune(config)
    client = MlflowClient(first.tracking_uri)
    name = config.registered_model
    assert first.verdict.decision == "first" and first.verdict.version == 1
    assert champion_of(client, name) == 1

    unchanged = finetune(tiny_config(tmp_path, **FAST))
    assert unchanged.verdict.decision == "skip" and unchanged.stages == []
    assert unchanged.verdict.previous_run == first.parent_run_id == unchanged.parent_run_id
    matched = client.get_run(first.parent_run_id)
    assert matched.data.tags[Tag.VERDICT] == "first"  # the skip counts itself without rewriting the verdict
    assert [m.value for m in client.get_metric_history(first.parent_run_id, "no_new_data_ticks")] == [1.0]
    assert champion_of(client, name) == 1
    assert "no new data" in prefect_verdict(matched.data.tags[Tag.LAST_SKIP])
    twice = finetune(tiny_config(tmp_path, **FAST))
    assert twice.verdict.decision == "skip"
    assert [m.value for m in client.get_metric_history(first.parent_run_id, "no_new_data_ticks")] == [1.0, 2.0]
    runs = client.search_runs([matched.info.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and all(run.data.metrics for run in runs)  # the first run and its stages only
    # `mixtune run` asks the same question before starting Prefect, and counts its tick the same way.
    assert skip_if_unchanged(tiny_config(tmp_path, **FAST)).previous_run == first.parent_run_id
    assert len(client.get_metric_history(first.parent_run_id, "no_new_data_ticks")) == 3
    assert len(client.search_runs([matched.info.experiment_id])) == len(runs)

    more_domain = {
        "sources": [
            {"synthetic": "general", "samples": 800, "role": "general"},
            {"synthetic": "domain", "samples": 600, "role": "domain", "val_fraction": 0.15},
        ]
    }
    third = finetune(tiny_config(tmp_path, data=more_domain, **FAST))
    verdict = third.verdict
    assert verdict.decision in ("promote", "reject") and verdict.version == 2
    assert verdict.champion is not None and verdict.challenger is not None
    assert champion_of(client, name) == (2 if verdict.decision == "promote" else 1)
    metrics = client.get_run(third.parent_run_id).data.metrics
    assert metrics["challenger_domain_nats_per_byte"] == pytest.approx(verdict.challenger.domain)
    assert metrics["champion_general_nats_per_byte"] == pytest.approx(verdict.champion.general)

    # A bar no model clears: the challenger is registered for the record, and the alias stays where it was.
    holder = champion_of(client, name)
    even_more = {"sources": [more_domain["sources"][0], {**more_domain["sources"][1], "samples": 700}]}
    fourth = finetune(tiny_config(tmp_path, data=even_more, registry={"min_improvement": 0.99}, **FAST))
    assert fourth.verdict.decision == "reject" and fourth.verdict.version == 3
    assert champion_of(client, name) == holder == fourth.verdict.champion_version
    version = client.get_model_version(name, "3")
    assert version.tags[Tag.DECISION] == "reject" and version.run_id == fourth.parent_run_id

    # The champion's inputs again, after another run trained: still no new data for the champion's recipe.
    champion_run = third if holder == 2 else first
    again = finetune(tiny_config(tmp_path, **({"data": more_domain} if holder == 2 else {}), **FAST))
    assert again.verdict.decision == "skip" and again.verdict.previous_run == champion_run.parent_run_id

    text, plot = compare(first.tracking_uri, "mixtune", tmp_path / "compare.png")
    table = comparison(
        pipeline_runs(first.tracking_uri, "mixtune"), {third.parent_run_id if holder == 2 else first.parent_run_id}
    )
    assert list(table["decision"]) == ["first", verdict.decision, "reject"]  # skips add no runs
    assert list(table["champion"]) == ["" if holder == 2 else "*", "*" if holder == 2 else "", ""]
    assert table["domain gain"].notna().sum() == 3
    assert "first" in text and "reject" in text and plot.stat().st_size > 10_000


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_the_champion_loads_through_mlflow_and_generates_offline(prefect_harness, tmp_path, monkeypatch):
    import mlflow
    import mlflow.transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tiny_config(tmp_path, schedule={"stages": 1, "samples_per_stage": 48})
    summary = finetune(config)
    version = MlflowClient(summary.tracking_uri).get_model_version_by_alias(config.registered_model, "champion")
    run_name = MlflowClient(summary.tracking_uri).get_run(summary.parent_run_id).info.run_name
    assert version.description.startswith(f"{run_name}: full SFT") and "Decision first" in version.description
    # Both also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which later runs in this process would use.
    mlflow.set_tracking_uri(summary.tracking_uri)
    mlflow.set_registry_uri(summary.tracking_uri)
    try:
        generator = mlflow.transformers.load_model(f"models:/{config.registered_model}@champion")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri(None) leaves it
    prompt = "What is 2 plus 3?"
    # A model trained for a few steps may answer with special tokens only, which plain text output drops.
    [answer] = generator(prompt, max_new_tokens=8, min_new_tokens=4, do_sample=False, return_tensors=True)
    prompt_ids = generator.tokenizer(prompt)["input_ids"]
    new_ids = answer["generated_token_ids"][len(prompt_ids) :]
    assert answer["generated_token_ids"][: len(prompt_ids)] == prompt_ids and len(new_ids) >= 4
    assert generator.tokenizer.decode(new_ids).strip()
    # README's example: chat messages, answered through the chat template, the assistant's turn last
    [chat] = generator([{"role": "user", "content": prompt}], max_new_tokens=8, min_new_tokens=4, do_sample=False)
    assert [turn["role"] for turn in chat["generated_text"]] == ["user", "assistant"]
    assert chat["generated_text"][0]["content"] == prompt


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_nats_per_byte_is_the_token_loss_rescaled_by_the_text_it_scores(prefect_harness, tmp_path):
    config = tiny_config(tmp_path, schedule={"stages": 1, "samples_per_stage": 48})
    summary = finetune(config)
    sft = sft_table(config)
    per_token, per_byte = (
        evaluate(summary.final_model, summary.final_model, str(sft), 32),
        nats_per_byte(summary.final_model, str(sft), 32),
    )
    for tag, (tokens, n_bytes) in target_counts(str(sft), summary.final_model).items():
        assert n_bytes > tokens > 0  # BPE tokens of this data are more than one byte long on average
        assert getattr(per_byte, tag) == pytest.approx(getattr(per_token, tag) * tokens / n_bytes)


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_a_failing_stage_ends_its_mlflow_runs_failed(prefect_harness, tmp_path, monkeypatch):
    @task(name="validate")
    def broken_validation(*args, **kwargs):
        raise RuntimeError("validation blew up")

    monkeypatch.setattr(flows.finetune, "validate_task", broken_validation)
    config = tiny_config(tmp_path, **FAST)
    with pytest.raises(RuntimeError, match="blew up"):
        finetune(config)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mixtune").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2  # the parent and stage 1
