"""Run names that never collide, and one champion decision at a time per pipeline."""

import re
from datetime import UTC, datetime

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.flow_engine import run_flow
from prefect.states import Scheduled
from prefect.utilities.schema_tools.validation import ValidationError

import flows.finetune
from flows.deployments import deployment_specs, run_form
from flows.finetune import finetune
from mixtune.compare import comparison, distinct_names, pipeline_runs
from mixtune.core.names import generated_name, name_candidates
from mixtune.core.policy import ServedPolicy
from tasks.mlflow_names import Tag
from tests.conftest import ONE_STEP, tiny_config
from tests.test_form import server_accepts
from tests.test_retrain import champion_of, prefect_verdict

# Two ids the scheduler made in one batch: UUIDv7, the same first 8 hex digits (the millisecond clock).
BATCH = ["01a2510f-4c5f-7a01-9e3b-5d2c8f0a11c4", "01a2510f-4c60-7b22-8c41-0f9d3e6a7b58"]
GENERATED = r"^test-\d{8}-\d{6}-[0-9a-f]{8}$"


def test_runs_due_in_the_same_second_with_ids_of_one_batch_get_two_names():
    due = datetime(2026, 12, 7, 3, 0, 0, tzinfo=UTC)
    names = [generated_name("tiny", due, flow_run_id) for flow_run_id in BATCH]
    assert names == ["tiny-20261207-030000-8f0a11c4", "tiny-20261207-030000-3e6a7b58"]


def test_a_taken_name_gets_more_of_the_id_and_the_last_candidate_is_the_whole_id():
    assert name_candidates("lr-sweep", BATCH[0]) == [
        "lr-sweep",
        "lr-sweep-8f0a11c4",
        "lr-sweep-01a2510f4c5f7a019e3b5d2c8f0a11c4",
    ]


def test_compare_labels_runs_that_were_named_alike_before_names_were_unique_apart():
    names = ["tiny-01a2510f", "tiny-01a2510f", "lora", "tiny-01a2510f"]
    assert distinct_names(names, ["aa11" * 8, "bb22" * 8, "cc33" * 8, "dd44" * 8])[:3] == [
        "tiny-01a2510f (aa11aa11)",
        "tiny-01a2510f (bb22bb22)",
        "lora",
    ]
    labels = distinct_names(names, ["aa11" * 8, "bb22" * 8, "cc33" * 8, "aa11" * 7 + "dd44"])
    assert labels[2] == "lora" and len(set(labels)) == 4
    assert labels[1] == f"tiny-01a2510f ({'bb22' * 8})"  # two of them start alike: the whole ids


def test_each_deployment_runs_one_at_a_time_and_a_tick_due_during_a_run_is_dropped(tmp_path):
    config = tiny_config(tmp_path, deploy={"cron": "*/3 * * * *"})
    manual, scheduled = deployment_specs(config)
    assert manual["concurrency_limit"].limit == scheduled["concurrency_limit"].limit == 1
    assert scheduled["concurrency_limit"].collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert manual["concurrency_limit"].collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    # a run that is slow to start on a loaded machine keeps its slot instead of being cancelled at 300 s
    assert scheduled["concurrency_limit"].grace_period_seconds == manual["concurrency_limit"].grace_period_seconds
    assert scheduled["concurrency_limit"].grace_period_seconds >= 1800


def test_the_form_takes_a_name_and_the_server_refuses_one_that_is_a_path(tmp_path):
    deployment = run_form(finetune.to_deployment(**deployment_specs(tiny_config(tmp_path))[0]))
    schema = deployment._parameter_openapi_schema.model_dump_for_openapi()
    server_accepts(schema, {**deployment.parameters, "name": "lr-sweep.3"})
    for bad in ("..", "a/b", ".hidden", "x" * 101):
        with pytest.raises(ValidationError):
            server_accepts(schema, {**deployment.parameters, "name": bad})


def due_now(flow_runs: list) -> None:
    """Moves scheduled runs' due time to now (all in one second: their names must still differ)."""
    with get_client(sync_client=True) as client:
        for run in flow_runs:
            client.set_flow_run_state(run.id, Scheduled(scheduled_time=datetime.now(UTC)), force=True)


def flow_runs_of(deployment_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
        )


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_four_runs_scheduled_in_one_batch_and_one_named_in_the_form_keep_distinct_names_everywhere(
    prefect_harness, tmp_path, monkeypatch
):
    config = tiny_config(tmp_path, **ONE_STEP, registry={"skip_unchanged": False}, deploy={"cron": "* * * * *"})
    monkeypatch.setenv(*ServedPolicy.for_served(config, tmp_path).to_env().popitem())
    manual, scheduled = (run_form(finetune.to_deployment(**spec)) for spec in deployment_specs(config))
    scheduled_id, manual_id = scheduled.apply(), manual.apply()
    with get_client(sync_client=True) as client:
        client._client.post(f"/deployments/{scheduled_id}/schedule", json={"min_runs": 4, "max_runs": 4})
        client.create_flow_run_from_deployment(manual_id, parameters={"name": "by-hand"}, name="xi-cassiopeiae")
    batch = flow_runs_of(scheduled_id)
    assert len(batch) == 4 and len({str(run.id)[:8] for run in batch}) == 1  # ids alike, as the issue saw them
    due_now(batch)  # the ticks are a minute apart: Prefect would hold each run until its minute came
    for flow_run in [*flow_runs_of(scheduled_id), *flow_runs_of(manual_id)]:
        run_flow(finetune, flow_run=flow_run, parameters=flow_run.parameters)

    prefect_names = {run.name for run in flow_runs_of(scheduled_id)}
    assert len(prefect_names) == 4 and all(re.match(GENERATED, name) for name in prefect_names)
    assert [run.name for run in flow_runs_of(manual_id)] == ["by-hand"]  # the form's name, not Prefect's
    runs = pipeline_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", config.tracking.experiment)
    assert sorted(runs["tags.mlflow.runName"]) == sorted([*prefect_names, "by-hand"])
    assert sorted(comparison(runs, set())["run"]) == sorted([*prefect_names, "by-hand"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = client.search_model_versions(f"name = '{config.registered_model}'")
    assert sorted(v.description.split(":")[0] for v in versions) == sorted([*prefect_names, "by-hand"])


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_two_runs_that_both_found_no_champion_end_with_one_first_and_one_real_challenge(
    prefect_harness, tmp_path, monkeypatch
):
    """Run A reads "no champion" and decides first; before it can move the alias, run B (same pipeline, same
    name asked for) runs whole and crowns itself. A then finds the alias moved and challenges B."""
    # The same model trained twice scores a hair apart either way: a 5% improvement required makes A lose.
    config = tiny_config(tmp_path, **ONE_STEP, registry={"skip_unchanged": False, "min_improvement": 0.05})
    crown, other = flows.finetune.crown_task, {}

    def b_runs_between_a_reading_and_moving_the_alias(*args):
        if "summary" not in other:  # once: B's own crown goes straight through
            other["summary"] = None
            other["summary"] = finetune(config, name="lr-sweep")
        return crown(*args)

    monkeypatch.setattr(flows.finetune, "crown_task", b_runs_between_a_reading_and_moving_the_alias)
    a = finetune(config, name="lr-sweep")
    b = other["summary"]

    client = MlflowClient(a.tracking_uri)
    name = config.registered_model
    assert b.verdict.decision == "first" and (b.verdict.version, champion_of(client, name)) == (2, 2)
    assert a.verdict.decision == "reject" and a.verdict.challenged == 2 and a.verdict.champion is not None
    assert (a.verdict.version, a.verdict.champion_version) == (1, 2)
    for summary in (a, b):
        run = client.get_run(summary.parent_run_id)
        version = client.get_model_version(name, str(summary.verdict.version))
        assert run.data.tags[Tag.VERDICT] == version.tags[Tag.DECISION] == summary.verdict.decision
        assert run.data.tags[Tag.CHAMPION_VERSION] == "2"
        assert f"alias `champion` is on version 2; this run's model is version {summary.verdict.version}" in (
            prefect_verdict(run.data.tags[Tag.FLOW_RUN])
        )
    assert client.get_run(a.parent_run_id).info.run_name == "lr-sweep"
    assert re.match(r"^lr-sweep-[0-9a-f]{8}$", client.get_run(b.parent_run_id).info.run_name)
