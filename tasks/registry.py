"""The MLflow model registry: who holds the champion alias, its files, and new versions."""

from __future__ import annotations

import shutil

from mlflow.exceptions import MlflowException

from mixtune.core.cache import Entry, entry_dir, fingerprint, is_complete, mark_complete
from tasks.tracking import Tracker

DESCRIPTION = "mixtune champions: fine-tuned causal LMs (HF folders)"


def champion_version(tracker: Tracker, name: str, alias: str):
    """The version holding `alias`, or None. A model that does not exist yet is looked up by search first:
    a server with NO_PERMISSIONS as default answers 403, not 404, for a model nobody may read."""
    if not tracker.client.search_registered_models(filter_string=f"name = '{name}'", max_results=1):
        return None
    try:
        return tracker.client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


DOMAIN_VAL_TAG = "mixtune.domain_val_digest"


def model_for(tracker: Tracker, name: str, alias: str, domain_val: str) -> tuple[str, object | None]:
    """The registered model a challenger competes in, and its champion (or None). A champion judged on another
    domain validation set is not comparable: the challenger then belongs to `<name>-<digest>`, its own model,
    and leaves that champion alone."""
    holder = champion_version(tracker, name, alias)
    if holder is None or holder.tags.get(DOMAIN_VAL_TAG) == domain_val:
        return name, holder
    own = f"{name}-{domain_val[:8]}"
    return own, champion_version(tracker, own, alias)


def fetch_version(tracker: Tracker, version, output_dir: str) -> str:
    """The version's files, downloaded once per version."""
    folder = entry_dir(output_dir, Entry.CHAMPION, fingerprint(version.name, version.version, version.run_id))
    artifact = version.tags.get("mixtune.artifact_path", "final_model")
    if not is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        tracker.client.download_artifacts(version.run_id, artifact, str(folder))
        mark_complete(folder)
    return str(folder / artifact)


def register_version(tracker: Tracker, name: str, model_dir: str, artifact_path: str, tags: dict) -> int:
    """The parent run's model as a new version of `name` (created on first use)."""
    if artifact_path != "final_model":
        tracker.log_artifacts(model_dir, artifact_path)
    try:
        tracker.client.create_registered_model(name, description=DESCRIPTION)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"mixtune.artifact_path": artifact_path, **{f"mixtune.{k}": str(v) for k, v in tags.items()}}
    version = tracker.client.create_model_version(
        name, f"runs:/{tracker.parent_run_id}/{artifact_path}", run_id=tracker.parent_run_id, tags=tags
    )
    return int(version.version)


def move_alias(tracker: Tracker, name: str, alias: str, version: int) -> None:
    tracker.client.set_registered_model_alias(name, alias, version)
