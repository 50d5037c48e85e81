"""MLflow: one parent run per flow run, one nested run per stage, found again by tag on a retry.

Everything goes through MlflowClient with explicit run ids: `mlflow.active_run()` is thread-local and
Prefect runs tasks in worker threads, so the fluent API would lose track of the runs.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from prefect import task

from mixtune.config import PipelineConfig
from mixtune.paths import default_tracking_uri

FLOW_RUN_TAG = "mixtune.flow_run_id"
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "mixtune.stage"
KIND_TAG = "mixtune.kind"  # "pipeline" on parent runs: what `mixtune compare` lists
HOST_TAG = "mixtune.host"
LOCK_TAG = "mixtune.lock"
RUNNING = RunStatus.to_string(RunStatus.RUNNING)
PARAM_LIMIT = 6000  # MLflow rejects longer param values


def tracking_uri(config: PipelineConfig) -> str:
    return config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(
        config.run.output_dir)


def experiment_id(client: MlflowClient, config: PipelineConfig) -> str:
    found = client.get_experiment_by_name(config.tracking.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(config) == default_tracking_uri(config.run.output_dir):
        # Next to the database, not in ./mlruns of whatever folder the command ran from.
        location = (Path(config.run.output_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(config.tracking.experiment, artifact_location=location)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:PARAM_LIMIT]
    return flat


def find_run(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def start_parent_run(config: PipelineConfig, flow_run_id: str) -> str:
    client = MlflowClient(tracking_uri(config))
    exp_id = experiment_id(client, config)
    end_abandoned_runs(client, exp_id)
    lock = Path(config.run.output_dir) / "locks" / f"{flow_run_id}.lock"
    found = find_run(client, exp_id, {FLOW_RUN_TAG: flow_run_id})
    if found:
        hold_lock(found, lock)
        return found
    tags = {FLOW_RUN_TAG: flow_run_id, KIND_TAG: "pipeline", "mixtune.run_name": config.run.name,
            "mixtune.method": config.train.method, HOST_TAG: socket.gethostname(), LOCK_TAG: str(lock)}
    run = client.create_run(exp_id, run_name=f"{config.run.name}-{flow_run_id[:8]}", tags=tags)
    hold_lock(run.info.run_id, lock)
    log_params(client, run.info.run_id, flatten(config.model_dump(mode="json")))
    return run.info.run_id


# A run's process holds an flock on its lock file for as long as it lives; the kernel lets go when the process
# dies, however it dies (SIGKILL and OOM included), so a free lock means the run's owner is gone.
_held_locks: dict[str, int] = {}


def hold_lock(run_id: str, path: Path) -> None:
    if run_id in _held_locks:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held_locks[run_id] = fd


def release_lock(run_id: str) -> None:
    fd = _held_locks.pop(run_id, None)
    if fd is not None:
        os.close(fd)


def owner_is_gone(lock: str) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def end_abandoned_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """Parent runs of this host left RUNNING by a process that no longer exists end KILLED, with their stages.
    Runs of other hosts are left to them: their locks cannot be seen from here."""
    query = f"attributes.status = '{RUNNING}' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    ended = []
    for run in client.search_runs([exp_id], filter_string=query):
        lock = run.data.tags.get(LOCK_TAG)
        if lock and owner_is_gone(lock):
            end_open_runs(client.tracking_uri, run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def stage_run(config: PipelineConfig, parent_id: str, stage: int, params: dict) -> str:
    """The stage's nested run: created once, found again by tag when the stage's task is retried."""
    client = MlflowClient(tracking_uri(config))
    exp_id = client.get_run(parent_id).info.experiment_id
    found = find_run(client, exp_id, {PARENT_TAG: parent_id, STAGE_TAG: str(stage)})
    if found:
        return found
    tags = {PARENT_TAG: parent_id, STAGE_TAG: str(stage), "mixtune.method": config.train.method}
    run = client.create_run(exp_id, run_name=f"stage-{stage}", tags=tags)
    log_params(client, run.info.run_id, {k: str(v)[:PARAM_LIMIT] for k, v in params.items()})
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_artifacts(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient(uri).log_text(run_id, text, artifact_file)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status)


def end_parent_run(uri: str, run_id: str) -> None:
    end_run(uri, run_id)
    release_lock(run_id)


def end_open_runs(uri: str, parent_id: str, status: str) -> None:
    """On failure: the parent and any stage still RUNNING end with `status`, never left RUNNING."""
    client = MlflowClient(uri)
    exp_id = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    for run in [*children, client.get_run(parent_id)]:
        if run.info.status == RUNNING:
            client.set_terminated(run.info.run_id, status)
    release_lock(parent_id)


def end_runs_of_flow_run(config: PipelineConfig, flow_run_id: str, status: str) -> str | None:
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    parent = experiment and find_run(client, experiment.experiment_id, {FLOW_RUN_TAG: flow_run_id})
    if parent:
        end_open_runs(client.tracking_uri, parent, status)
    return parent


def metric_curves(uri: str, run_id: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(uri)
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in names}


@task(name="start-tracking", retries=3, retry_delay_seconds=[2, 5, 15])
def start_tracking_task(config: PipelineConfig, flow_run_id: str) -> str:
    return start_parent_run(config, flow_run_id)
