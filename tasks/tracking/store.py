"""The tracking store behind the seam: its one MlflowClient per URI, run searches and the UI's addresses."""

from __future__ import annotations

import fcntl
import logging
import os
import re
from functools import lru_cache, wraps
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mixtune.core.config import PipelineConfig
from mixtune.core.disk import disk_full_as, error_chain, free_bytes, readable_size, says_disk_full
from mixtune.core.paths import default_tracking_uri
from mixtune.core.uris import redact_uri
from tasks.mlflow_names import MlflowTag, Tag

RUNNING = RunStatus.to_string(RunStatus.RUNNING)
FINISHED = RunStatus.to_string(RunStatus.FINISHED)
KILLED = RunStatus.to_string(RunStatus.KILLED)
PARAM_LIMIT = 6000  # MLflow rejects longer param values


def metric_name(source: str) -> str:
    """MLflow metric names allow letters, digits, and _ - . / space: a source's path or label, made to fit."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name if "/" in source else source)


class StoreClient(MlflowClient):
    """MlflowClient whose calls that fail for want of space in the tracking store raise DiskFull naming where and
    how much is free: said once here, whichever write (a param, a metric, a run's end) meets the full disk first,
    instead of MLflow's chained SQLAlchemy tracebacks (and tasks that retry all but DiskFull stop at once)."""

    def __getattribute__(self, name: str):
        attribute = super().__getattribute__(name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        uri = super().__getattribute__("tracking_uri")

        @wraps(attribute)
        def said_when_full(*args, **kwargs):
            with disk_full_as(lambda err: store_full(uri, err)):
                return attribute(*args, **kwargs)

        return said_when_full


class FullStoreSaidOnce(logging.Filter):
    """MLflow logs a failed SQL write at ERROR, with its SQL, parameters and traceback, before it raises it: for a
    full disk the StoreClient's DiskFull says it in one line, so that record is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and says_disk_full(record.exc_info[1]))


logging.getLogger("mlflow.store.db.utils").addFilter(FullStoreSaidOnce())


def store_full(uri: str, err: BaseException) -> str:
    """The DiskFull message for the store at `uri`: its folder (a SQLite file's, or the file an artifact write
    failed on) and the space free there, or, for a server, the server."""
    scheme = urlsplit(uri).scheme
    again = "and run again: it continues from the last good checkpoint"
    if scheme not in ("", "file", "sqlite"):
        return f"the MLflow tracking store {redact_uri(uri)} says its disk is full: free some space there {again}"
    local = uri.removeprefix("sqlite:///") if scheme == "sqlite" else urlsplit(uri).path
    folder = failed_file_folder(err) or Path(local).absolute().parent
    return (
        f"disk full while writing to the MLflow tracking store in {folder}: {readable_size(free_bytes(folder))} free "
        f"there; free some space there {again}"
    )


def failed_file_folder(err: BaseException) -> Path | None:
    return next((Path(e.filename).parent for e in error_chain(err) if isinstance(e, OSError) and e.filename), None)


@lru_cache(maxsize=8)
def client_for(uri: str) -> MlflowClient:
    """The only MlflowClient constructor in mixtune, one client per tracking URI and process; private to the
    seam (tasks/tracking): everything else calls the seam's functions and methods."""
    if not uri.startswith("sqlite:///"):
        return StoreClient(uri)
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a SQLite store when a client first opens it; two processes doing it at once
    # broke the database for good ("table _alembic_tmp_experiments already exists"). So the first opening
    # happens under an flock beside the database: a second process waits, then finds the store made.
    fd = os.open(database.with_name(f"{database.name}.init.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        client = StoreClient(uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)  # the registry opens the same database on its own
    finally:
        os.close(fd)
    return client


def open_store(uri: str) -> None:
    """Creates (and migrates) the store at `uri` if it is a database not made yet."""
    client_for(uri)


def ui_url(uri: str) -> str | None:
    """A tracking server's UI lives at its own address; a database file or folder has none to link to."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def run_url(uri: str, exp_id: str, run_id: str) -> str | None:
    base = ui_url(uri)
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}" if base else None


def runs_page(uri: str, experiment: str) -> str:
    """The experiment's run list (the UI opens on GenAI traces otherwise); relative to the UI for a database."""
    exp_id = client_for(uri).get_experiment_by_name(experiment).experiment_id
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


def metric_curves(uri: str, run_id: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    client = client_for(uri)
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, str(name))) for name in names}


def pipeline_runs(uri: str, experiment: str) -> list:
    """The parent runs of an experiment, oldest first: what `mixtune compare` lists."""
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{Tag.KIND}` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
        max_results=50_000,
    )


def stage_runs(client: MlflowClient, exp_id: str, parent_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`{MlflowTag.PARENT_RUN}` = '{parent_id}'")
