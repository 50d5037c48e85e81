"""The MLflow model registry: who holds the champion alias, its files, and new versions."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from contextlib import contextmanager

from mixtune.core.cache import Entry, building, entry_dir, fingerprint, mark_complete
from mixtune.core.logs import run_logger
from mixtune.core.paths import locks_dir
from mixtune.core.uris import split_credentials
from tasks.mlflow_names import Tag
from tasks.tracking import Experiment, Tracker

DESCRIPTION = "mixtune champions: fine-tuned causal LMs (HF folders)"


def champion_version(tracker: Experiment, name: str, alias: str):
    """The version holding `alias`, or None; None too when the run that made it did not end FINISHED."""
    version = tracker.alias_version(name, alias)
    if version is None:
        return None
    status = tracker.run(version.run_id).info.status
    if status != "FINISHED":  # the alias moves after its run ends FINISHED: this one died before, or failed
        run_logger().warning(
            "%s@%s is version %s of run %s, which ended %s: no champion",
            name,
            alias,
            version.version,
            version.run_id,
            status,
        )
        return None
    return version


def model_for(tracker: Tracker, name: str, alias: str, domain_val: str) -> tuple[str, object | None]:
    """The registered model a challenger competes in, and its champion (or None). A champion judged on another
    domain validation set is not comparable: the challenger then belongs to `<name>-<digest>`, its own model,
    and leaves that champion alone."""
    holder = champion_version(tracker, name, alias)
    if holder is None or holder.tags.get(Tag.DOMAIN_VAL_DIGEST) == domain_val:
        return name, holder
    own = f"{name}-{domain_val[:8]}"
    return own, champion_version(tracker, own, alias)


def fetch_version(tracker: Tracker, version, output_dir: str) -> str:
    """The version's files, downloaded once per version."""
    folder = entry_dir(output_dir, Entry.CHAMPION, fingerprint(version.name, version.version, version.run_id))
    artifact = version.tags.get(Tag.ARTIFACT_PATH, "final_model")
    with building(folder) as build:
        if build:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            tracker.download_artifacts(version.run_id, artifact, str(folder))
            mark_complete(folder)
    return str(folder / artifact)


def register_version(
    tracker: Tracker, name: str, model_dir: str, artifact_path: str, tags: dict, description: str
) -> int:
    """The parent run's model as a new version of `name` (created on first use), tagged with `tags` (names from
    tasks/tracking/names.py). The version's source is the MLflow model; `Tag.ARTIFACT_PATH` names the plain HF
    folder the next challenge downloads. A run that challenges again (the alias moved under it) keeps its
    version, whose tags and description are updated."""
    tags = {Tag.ARTIFACT_PATH: artifact_path, **{key: str(value) for key, value in tags.items()}}
    mine = tracker.version_of_run(name, tracker.parent_run_id)
    if mine is not None:
        tracker.update_version(name, mine, tags, description)
        return mine
    if artifact_path != "final_model":
        tracker.log_artifacts(model_dir, artifact_path)
    tracker.log_mlflow_model(model_dir)
    return tracker.create_version(name, tracker.parent_run_id, tags, description, DESCRIPTION)


@contextmanager
def alias_lock(output_dir: str, uri: str, name: str):
    """Held while a run re-reads and moves a model's alias: runs of this host take turns. Runs on other hosts
    share no lock: their turn is the re-read against the registry itself (tasks/champion.py crown)."""
    key = hashlib.sha256(f"{split_credentials(uri)[0]} {name}".encode()).hexdigest()[:16]
    path = locks_dir(output_dir) / f"alias-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
