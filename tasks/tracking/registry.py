"""The MLflow model registry, as methods of an experiment's handle: versions, aliases and their files."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException

from tasks.tracking.store import client_for

MLFLOW_MODEL = "mlflow_model"  # the registered source: an MLmodel with the transformers flavour
NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
SIGNATURE_EXAMPLE = ("What is 2 plus 3?", "2 plus 3 is 5.", {"max_new_tokens": 64})  # prompt, answer, params


class Registry:
    """Mixed into `Experiment` (tasks/tracking/runs.py), whose `_client` these use; the registry itself
    belongs to the tracking server, not to the experiment."""

    def alias_version(self, name: str, alias: str):
        """The version holding `alias`, or None. A model that does not exist yet is looked up by search first:
        a server with NO_PERMISSIONS as default answers 403, not 404, for a model nobody may read."""
        if not self._client.search_registered_models(filter_string=f"name = '{name}'", max_results=1):
            return None
        try:
            return self._client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if err.error_code in NOT_THERE:
                return None
            raise

    def model_names(self, prefix: str) -> list[str]:
        """The registered models whose names start with `prefix`."""
        return [m.name for m in self._client.search_registered_models(filter_string=f"name LIKE '{prefix}%'")]

    def download_artifacts(self, run_id: str, artifact: str, folder: str) -> None:
        self._client.download_artifacts(run_id, artifact, folder)

    def move_alias(self, name: str, alias: str, version: int) -> None:
        self._client.set_registered_model_alias(name, alias, version)

    def version_of_run(self, name: str, run_id: str) -> int | None:
        """The version of `name` that run `run_id` registered, if it did."""
        mine = self._client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return int(mine[0].version) if mine else None

    def update_version(self, name: str, version: int, tags: dict, description: str) -> None:
        for key, value in tags.items():
            self._client.set_model_version_tag(name, str(version), str(key), value)
        self._client.update_model_version(name, str(version), description=description)

    def create_version(self, name: str, run_id: str, tags: dict, description: str, model_description: str) -> int:
        """A new version of `name` (created with `model_description` on first use) whose source is the MLflow
        model that run `run_id` logged (tasks/tracking/runs.py Tracker.log_mlflow_model)."""
        self.ensure_registered_model(name, model_description)
        version = self._client.create_model_version(
            name,
            self.model_source(run_id),
            run_id=run_id,
            tags={str(k): v for k, v in tags.items()},
            run_link=self.run_url(run_id),
            description=description,
        )
        return int(version.version)

    def ensure_registered_model(self, name: str, description: str) -> None:
        """The registered model, described; one made without a description (by `mlflow-init` in the Compose
        stack, or an older mixtune) gets it."""
        try:
            self._client.create_registered_model(name, description=description)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            if not self._client.get_registered_model(name).description:
                self._client.update_registered_model(name, description=description)

    def model_source(self, run_id: str) -> str:
        """Where the logged MLflow model lies, as the run's artifact root names it, not `runs:/<id>/...`: a
        server with --serve-artifacts resolves a `runs:` source through its own tracking URI (a database, not
        http) and answers HTTP 500 for the version's MLmodel; an `mlflow-artifacts:` location it serves itself."""
        root = self._client.get_run(run_id).info.artifact_uri
        return f"{root.rstrip('/')}/{MLFLOW_MODEL}"


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


def alias_run_id(uri: str, model_name: str, alias: str) -> str | None:
    try:
        return client_for(uri).get_model_version_by_alias(model_name, alias).run_id
    except MlflowException:
        return None
