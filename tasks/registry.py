"""The MLflow model registry: who holds the champion alias, its files, and new versions."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlflow.exceptions import MlflowException

from mixtune.core.cache import Entry, building, entry_dir, fingerprint, mark_complete
from mixtune.core.logs import run_logger
from mixtune.core.paths import locks_dir
from mixtune.core.uris import split_credentials
from tasks.tracking import Experiment, Tracker

DESCRIPTION = "mixtune champions: fine-tuned causal LMs (HF folders)"


def champion_version(tracker: Experiment, name: str, alias: str):
    """The version holding `alias`, or None. A model that does not exist yet is looked up by search first:
    a server with NO_PERMISSIONS as default answers 403, not 404, for a model nobody may read."""
    if not tracker.client.search_registered_models(filter_string=f"name = '{name}'", max_results=1):
        return None
    try:
        version = tracker.client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    status = tracker.client.get_run(version.run_id).info.status
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
    with building(folder) as build:
        if build:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            tracker.client.download_artifacts(version.run_id, artifact, str(folder))
            mark_complete(folder)
    return str(folder / artifact)


MLFLOW_MODEL = "mlflow_model"  # the registered source: an MLmodel with the transformers flavour
SIGNATURE_EXAMPLE = ("What is 2 plus 3?", "2 plus 3 is 5.", {"max_new_tokens": 64})  # prompt, answer, params


def save_mlflow_model(model_dir: str, folder: Path) -> None:
    """A standalone HF folder (weights and tokenizer) as an MLflow transformers model, so that
    `mlflow.transformers.load_model("models:/<name>@<alias>")` and `mlflow models serve` work on a version.
    Requirements are pinned from this environment: inferring them imports the model in a subprocess."""
    import mlflow
    import mlflow.transformers
    import torch
    import transformers
    from huggingface_hub import ModelCard
    from mlflow.models import infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer

    components = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False),
    }
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__}"]
    requirements.append(f"transformers=={transformers.__version__}")
    # A card of our own: without one MLflow asks the hub for a card named after the local path, and warns.
    card = ModelCard(f"A causal language model fine-tuned by mixtune, saved from `{model_dir}`.")
    # A signature of our own, with the generation bound as a parameter: what the registry page shows as schema.
    prompt, answer, params = SIGNATURE_EXAMPLE
    mlflow.transformers.save_model(
        components,
        str(folder),
        task="text-generation",
        signature=infer_signature(prompt, answer, params=params),
        pip_requirements=requirements,
        model_card=card,
    )


def register_version(
    tracker: Tracker, name: str, model_dir: str, artifact_path: str, tags: dict, description: str
) -> int:
    """The parent run's model as a new version of `name` (created on first use). The version's source is the
    MLflow model; `mixtune.artifact_path` names the plain HF folder the next challenge downloads. A run that
    challenges again (the alias moved under it) keeps its version, whose tags and description are updated."""
    tags = {"mixtune.artifact_path": artifact_path, **{f"mixtune.{k}": str(v) for k, v in tags.items()}}
    mine = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{tracker.parent_run_id}'")
    if mine:
        for key, value in tags.items():
            tracker.client.set_model_version_tag(name, mine[0].version, key, value)
        tracker.client.update_model_version(name, mine[0].version, description=description)
        return int(mine[0].version)
    if artifact_path != "final_model":
        tracker.log_artifacts(model_dir, artifact_path)
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as scratch:
        save_mlflow_model(model_dir, Path(scratch) / MLFLOW_MODEL)
        tracker.log_artifacts(Path(scratch) / MLFLOW_MODEL, MLFLOW_MODEL)
    ensure_registered_model(tracker, name)
    version = tracker.client.create_model_version(
        name,
        model_source(tracker),
        run_id=tracker.parent_run_id,
        tags=tags,
        run_link=tracker.run_url(tracker.parent_run_id),
        description=description,
    )
    return int(version.version)


def ensure_registered_model(tracker: Tracker, name: str) -> None:
    """The registered model, described; one made without a description (by `mlflow-init` in the Compose stack,
    or an older mixtune) gets it."""
    try:
        tracker.client.create_registered_model(name, description=DESCRIPTION)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if not tracker.client.get_registered_model(name).description:
            tracker.client.update_registered_model(name, description=DESCRIPTION)


def model_source(tracker: Tracker) -> str:
    """Where the logged MLflow model lies, as the run's artifact root names it, not `runs:/<id>/...`: a server
    with --serve-artifacts resolves a `runs:` source through its own tracking URI (a database, not http) and
    answers HTTP 500 for the version's MLmodel; an `mlflow-artifacts:` location it serves itself."""
    root = tracker.client.get_run(tracker.parent_run_id).info.artifact_uri
    return f"{root.rstrip('/')}/{MLFLOW_MODEL}"


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


def move_alias(tracker: Tracker, name: str, alias: str, version: int) -> None:
    tracker.client.set_registered_model_alias(name, alias, version)
