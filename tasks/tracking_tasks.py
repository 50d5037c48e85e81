"""The Prefect tasks that open and end the tracking seam's runs (tasks/tracking): retries and the link to the
MLflow run in the flow run's artifacts; the seam itself stays free of Prefect."""

from __future__ import annotations

from prefect import task

from mixtune.core.config import PipelineConfig
from tasks import artifacts
from tasks.tracking import Experiment, Tracker, open_experiment, start_parent_run


@task(name="open-experiment", task_run_name="open experiment", retries=3, retry_delay_seconds=[2, 5, 15])
def open_experiment_task(config: PipelineConfig) -> Experiment:
    return open_experiment(config)


@task(name="start-tracking", task_run_name="start tracking", retries=3, retry_delay_seconds=[2, 5, 15])
def start_tracking_task(
    config: PipelineConfig,
    flow_run_id: str,
    tags: dict[str, str],
    run_folder: str,
    input_hash: str | None = None,
    name: str | None = None,
) -> Tracker:
    tracker = start_parent_run(config, flow_run_id, tags, run_folder, input_hash, name)
    url = tracker.run_url(tracker.parent_run_id)
    if url:  # a database file has no UI address to link; the run id is in the final-model artifact either way
        artifacts.link("mlflow-run", url, f"MLflow run {tracker.parent_run_id}", "This flow run's MLflow parent run")
    return tracker


@task(name="open-stage-run", task_run_name="open stage {stage} run", retries=3, retry_delay_seconds=[2, 5, 15])
def open_stage_task(tracker: Tracker, stage: int, method: str) -> Tracker:
    return tracker.open_stage(stage, method)


@task(name="end-run", task_run_name="end run {tracker.run_name}", retries=3, retry_delay_seconds=[2, 5, 15])
def end_run_task(tracker: Tracker, status: str = "FINISHED") -> None:
    tracker.end(status)
