"""The one MLflow seam: a parent run per flow run, a nested run per stage, found again by tag on a retry.

The flow holds a `Tracker` for its parent run and hands stages a `Tracker` for their own run; nothing else
talks to MLflow. Everything goes through MlflowClient with explicit run ids: `mlflow.active_run()` is
thread-local and Prefect runs tasks in worker threads, so the fluent API would lose track of the runs.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import re
import socket
import time
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from pydantic import BaseModel

from mixtune.core.config import PipelineConfig
from mixtune.core.names import generated_name, name_candidates
from mixtune.core.paths import default_tracking_uri, locks_dir, tracking_uri
from tasks import artifacts

FLOW_RUN_TAG = "mixtune.flow_run_id"
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "mixtune.stage"
KIND_TAG = "mixtune.kind"  # "pipeline" on parent runs: what `mixtune compare` lists
HOST_TAG = "mixtune.host"
LOCK_TAG = "mixtune.lock"
INPUT_HASH_TAG = "mixtune.input_hash"
RUN_FOLDER_TAG = "mixtune.run_folder"  # the folder of the run's stages: a resumed run finds it here
ABANDONED_TAG = "mixtune.abandoned"  # ended KILLED because its process was gone: a rerun may still adopt it
RESUMED_TAG = "mixtune.resumed_from_flow_runs"
NAME_TAG = "mlflow.runName"
RUNNING = RunStatus.to_string(RunStatus.RUNNING)
FINISHED = RunStatus.to_string(RunStatus.FINISHED)
KILLED = RunStatus.to_string(RunStatus.KILLED)
PARAM_LIMIT = 6000  # MLflow rejects longer param values
BATCH = 100  # params per log_batch call: MLflow's limit


def metric_name(source: str) -> str:
    """MLflow metric names allow letters, digits, and _ - . / space: a source's path or label, made to fit."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name if "/" in source else source)


@lru_cache(maxsize=8)
def client_for(uri: str) -> MlflowClient:
    """The only MlflowClient constructor in mixtune, one client per tracking URI and process."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a SQLite store when a client first opens it; two processes doing it at once
    # broke the database for good ("table _alembic_tmp_experiments already exists"). So the first opening
    # happens under an flock beside the database: a second process waits, then finds the store made.
    fd = os.open(database.with_name(f"{database.name}.init.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)  # the registry opens the same database on its own
    finally:
        os.close(fd)
    return client


class Experiment(BaseModel):
    """An experiment on a tracking server, before any run of this flow exists: what the skip check reads."""

    uri: str
    experiment_id: str

    @property
    def client(self) -> MlflowClient:
        return client_for(self.uri)

    def run_url(self, run_id: str) -> str | None:
        return run_url(self.uri, self.experiment_id, run_id)


class Tracker(Experiment):
    """One MLflow run of a pipeline: the parent run (stage None) or a stage's nested run. Plain data, so
    Prefect can pass it to tasks and hash it; the client is looked up from the URI."""

    parent_run_id: str
    stage: int | None = None
    stage_run_id: str | None = None
    run_folder: str = ""
    resumed: bool = False
    name: str = ""  # the parent run's name, unique in its experiment (mixtune/core/names.py)

    @property
    def run_id(self) -> str:
        return self.stage_run_id or self.parent_run_id

    @property
    def run_name(self) -> str:
        """How Prefect names the tasks that act on this run: "stage 2" or "parent"."""
        return "parent" if self.stage is None else f"stage {self.stage}"

    def parent(self) -> Tracker:
        return self.model_copy(update={"stage": None, "stage_run_id": None})

    def open_stage(self, stage: int, method: str) -> Tracker:
        """The stage's nested run: created once, found again by tag when the stage is retried or resumed."""
        tags = {PARENT_TAG: self.parent_run_id, STAGE_TAG: str(stage)}
        run_id = find_run(self.client, self.experiment_id, tags)
        if run_id is not None and self.client.get_run(run_id).info.status not in (RUNNING, FINISHED):
            self.client.update_run(run_id, status=RUNNING)  # the stage of an adopted run, interrupted
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=f"stage-{stage}", tags={**tags, "mixtune.method": method}
            )
            run_id = run.info.run_id
        return self.model_copy(update={"stage": stage, "stage_run_id": run_id})

    def log_params(self, params: dict) -> None:
        items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Each (metric, step) is recorded once: a resumed run redoes the steps after its last checkpoint and
        re-enters finished tasks, and its curves must not show those steps twice."""
        logged = logged_steps(self.client, self.run_id)
        fresh = {k: v for k, v in metrics.items() if (k, step) not in logged}
        if not fresh:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in fresh.items()])
        logged.update((k, step) for k in fresh)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, frame, artifact_file: str) -> None:
        """A JSON table the MLflow UI previews as a table (and the run's "evaluation" tab lists)."""
        self.client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_inputs(self, datasets: list) -> None:
        self.client.log_inputs(self.run_id, datasets=datasets)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def tags(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.tags

    def metric_curves(self, names: list[str], run_id: str | None = None) -> dict[str, list[tuple[int, float]]]:
        return metric_curves(self.uri, run_id or self.run_id, names)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
        if self.stage_run_id is None:
            release_lock(self.parent_run_id)

    def silent(self) -> SilentTracker:
        return SilentTracker(**self.model_dump())


class SilentTracker(Tracker):
    """What a training process other than the first (torchrun rank > 0) holds: rank 0 alone writes to MLflow,
    so every curve has one writer and no step is logged N times."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifacts(self, path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass


def ui_url(uri: str) -> str | None:
    """A tracking server's UI lives at its own address; a database file or folder has none to link to."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def run_url(uri: str, exp_id: str, run_id: str) -> str | None:
    base = ui_url(uri)
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}" if base else None


def runs_page(uri: str, exp_id: str) -> str:
    """The experiment's run list (the UI opens on GenAI traces otherwise); relative to the UI for a database."""
    return f"{ui_url(uri) or 'http://127.0.0.1:5000'}/#/experiments/{exp_id}/runs"


_logged: dict[str, set[tuple[str, int]]] = {}


def logged_steps(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """The (metric, step) pairs a run already holds, read from the server once per process and run."""
    if run_id not in _logged:
        names = client.get_run(run_id).data.metrics
        _logged[run_id] = {(name, m.step) for name in names for m in client.get_metric_history(run_id, name)}
    return _logged[run_id]


def experiment_id(client: MlflowClient, config: PipelineConfig) -> str:
    found = client.get_experiment_by_name(config.tracking.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri == default_tracking_uri(config.run.output_dir):
        # Next to the database, not in ./mlruns of whatever folder the command ran from.
        location = (Path(config.run.output_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(config.tracking.experiment, artifact_location=location)
    except MlflowException:  # another run created it a moment ago
        found = client.get_experiment_by_name(config.tracking.experiment)
        if found is None:
            raise
        return found.experiment_id


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


def open_experiment(config: PipelineConfig) -> Experiment:
    client = client_for(tracking_uri(config))
    return Experiment(uri=client.tracking_uri, experiment_id=experiment_id(client, config))


def source_tags(flow_run_url: str | None, deployed: bool) -> dict[str, str]:
    """What MLflow's UI shows as Source and Created by, and the description linking the Prefect flow run."""
    tags = {
        "mlflow.source.name": "mixtune finetune flow",
        "mlflow.source.type": "JOB" if deployed else "LOCAL",
        "mlflow.user": getpass.getuser(),
    }
    if flow_run_url:
        tags["mixtune.prefect_flow_run_url"] = flow_run_url
        tags["mlflow.note.content"] = f"Prefect flow run: [{flow_run_url}]({flow_run_url})"
    return tags


def start_parent_run(
    config: PipelineConfig,
    flow_run_id: str,
    tags: dict[str, str] | None = None,
    run_folder: str = "",
    input_hash: str | None = None,
    name: str | None = None,
) -> Tracker:
    """The flow run's parent run: found again on a task retry; else, given the inputs hash, an unfinished run
    of the same inputs whose process is gone, adopted; else a new one with `tags` (input hash, links), named
    `name` or, if another pipeline run of the experiment has that name, `name` and the end of the id."""
    client = client_for(tracking_uri(config))
    exp_id = experiment_id(client, config)
    lock = lock_path(config, flow_run_id)
    tracker = Tracker(uri=client.tracking_uri, experiment_id=exp_id, parent_run_id="", run_folder=run_folder)
    found = find_run(client, exp_id, {FLOW_RUN_TAG: flow_run_id})
    if found:
        hold_lock(found, lock)
        return own(tracker, client.get_run(found))
    adopted = adopt_unfinished_run(client, exp_id, input_hash, flow_run_id, lock) if input_hash else None
    end_abandoned_runs(client, exp_id)
    if adopted:
        return own(tracker, adopted).model_copy(update={"resumed": True})
    tags = {
        **(tags or {}),
        FLOW_RUN_TAG: flow_run_id,
        KIND_TAG: "pipeline",
        "mixtune.run_name": config.run.name,
        "mixtune.method": config.train.method,
        HOST_TAG: socket.gethostname(),
        LOCK_TAG: str(lock),
        RUN_FOLDER_TAG: run_folder,
    }
    wanted = name or generated_name(config.run.name, datetime.now(UTC), flow_run_id)
    run = client.create_run(exp_id, run_name=free_name(client, exp_id, wanted, flow_run_id), tags=tags)
    hold_lock(run.info.run_id, lock)
    tracker = tracker.model_copy(update={"parent_run_id": run.info.run_id, "name": run.info.run_name})
    tracker.log_params(flatten(config.public_dump()))
    return tracker


def own(tracker: Tracker, run) -> Tracker:
    folder = run.data.tags.get(RUN_FOLDER_TAG) or tracker.run_folder
    return tracker.model_copy(
        update={"parent_run_id": run.info.run_id, "run_folder": folder, "name": run.info.run_name}
    )


def free_name(client: MlflowClient, exp_id: str, wanted: str, flow_run_id: str) -> str:
    """The first of `wanted`'s candidates no pipeline run of the experiment holds."""
    candidates = name_candidates(wanted, flow_run_id)
    return next(
        (c for c in candidates if not find_run(client, exp_id, {KIND_TAG: "pipeline", NAME_TAG: c})), candidates[-1]
    )


def adopt_unfinished_run(client: MlflowClient, exp_id: str, input_hash: str, flow_run_id: str, lock: Path):
    """The newest parent run of this host with the same inputs hash whose process died before it ended: it
    becomes this flow run's (RUNNING again, its tags pointing at this process), so the pipeline continues in
    its folder. Other hosts' runs are left alone: their locks cannot be seen from here."""
    query = (
        f"tags.`{KIND_TAG}` = 'pipeline' and tags.`{HOST_TAG}` = '{socket.gethostname()}' "
        f"and tags.`{INPUT_HASH_TAG}` = '{input_hash}'"
    )
    for run in client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"]):
        tags, status = run.data.tags, run.info.status
        abandoned = (status == RUNNING and owner_is_gone(tags.get(LOCK_TAG, ""))) or (
            status == KILLED and tags.get(ABANDONED_TAG) == "true"
        )
        if not abandoned or not tags.get(RUN_FOLDER_TAG):
            continue
        previous = [tags[key] for key in (RESUMED_TAG, FLOW_RUN_TAG) if tags.get(key)]
        hold_lock(run.info.run_id, lock)
        client.update_run(run.info.run_id, status=RUNNING)
        for key, value in {FLOW_RUN_TAG: flow_run_id, LOCK_TAG: str(lock), RESUMED_TAG: ",".join(previous)}.items():
            client.set_tag(run.info.run_id, key, value)
        if tags.get(ABANDONED_TAG):
            client.delete_tag(run.info.run_id, ABANDONED_TAG)
        return client.get_run(run.info.run_id)
    return None


# A run's process holds an flock on its lock file for as long as it lives; the kernel lets go when the process
# dies, however it dies (SIGKILL and OOM included), so a free lock means the run's owner is gone.
_held_locks: dict[str, int] = {}


def hold_lock(run_id: str, path: Path) -> None:
    if run_id in _held_locks:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lock_status(path, RUNNING)  # the lock path is this flow run's own: nobody else holds it
    fd = os.open(path, os.O_RDWR)
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
    """Parent runs of this host left RUNNING by a process that no longer exists end with their stages: FAILED
    when the process failed but could not tell MLflow (the server was down; it left the status in its lock
    file), else KILLED. Runs of other hosts are left to them: their locks cannot be seen from here."""
    query = f"attributes.status = '{RUNNING}' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    ended = []
    for run in client.search_runs([exp_id], filter_string=query):
        lock = run.data.tags.get(LOCK_TAG)
        if lock and owner_is_gone(lock):
            end_open_runs(client, run.info.run_id, pending_status(Path(lock)))
            client.set_tag(run.info.run_id, ABANDONED_TAG, "true")
            ended.append(run.info.run_id)
    return ended


def lock_path(config: PipelineConfig, flow_run_id: str) -> Path:
    return locks_dir(config.run.output_dir) / f"{flow_run_id}.lock"


def write_lock_status(path: Path, status: str) -> None:
    """A lock file always holds a status: written beside it and renamed over it, so a full disk leaves the old
    one whole instead of an empty file. The rename lets go of this process's flock on the old file too."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(status)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def leave_status(config: PipelineConfig, flow_run_id: str, status: str) -> bool:
    """For the next start on this host, when MLflow cannot be told now how this flow run ended. False when it
    could not be written either (a full disk): the lock file keeps RUNNING, and the next start reads KILLED."""
    path = lock_path(config, flow_run_id)
    if not path.is_file():
        return False
    try:
        write_lock_status(path, status)
    except OSError:
        return False
    return True


def pending_status(lock: Path) -> str:
    try:
        status = lock.read_text().strip()
    except OSError:
        return "KILLED"
    return status if status in ("FAILED", "KILLED") else "KILLED"


def end_open_runs(client: MlflowClient, parent_id: str, status: str) -> None:
    """On failure: the parent and any stage still RUNNING end with `status`, never left RUNNING."""
    exp_id = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    for run in [*children, client.get_run(parent_id)]:
        if run.info.status == RUNNING:
            client.set_terminated(run.info.run_id, status)
    release_lock(parent_id)


def end_runs_of_flow_run(config: PipelineConfig, flow_run_id: str, status: str) -> str | None:
    client = client_for(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    parent = experiment and find_run(client, experiment.experiment_id, {FLOW_RUN_TAG: flow_run_id})
    if parent:
        end_open_runs(client, parent, status)
    return parent


def metric_curves(uri: str, run_id: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    client = client_for(uri)
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in names}


def pipeline_runs(uri: str, experiment: str) -> list:
    """The parent runs of an experiment, oldest first: what `mixtune compare` lists."""
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
        max_results=50_000,
    )


def alias_run_id(uri: str, model_name: str, alias: str) -> str | None:
    try:
        return client_for(uri).get_model_version_by_alias(model_name, alias).run_id
    except MlflowException:
        return None


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
