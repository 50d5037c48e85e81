"""An experiment, and one run of it: what the flow and the stages hold, and every read and write they do."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.mlflow_names import MlflowTag, Tag
from tasks.tracking.locks import release_lock
from tasks.tracking.registry import MLFLOW_MODEL, Registry, save_mlflow_model
from tasks.tracking.store import (
    FINISHED,
    PARAM_LIMIT,
    RUNNING,
    client_for,
    find_run,
    logged_steps,
    metric_curves,
    run_url,
    stage_runs,
)

BATCH = 100  # params per log_batch call: MLflow's limit


class Experiment(Registry, BaseModel):
    """An experiment on a tracking server, before any run of this flow exists: what the skip check reads."""

    uri: str
    experiment_id: str

    @property
    def _client(self) -> MlflowClient:
        return client_for(self.uri)

    def run_url(self, run_id: str) -> str | None:
        return run_url(self.uri, self.experiment_id, run_id)

    def run(self, run_id: str):
        """A run's record: its status (`.info.status`), tags, params and latest metrics (`.data`)."""
        return self._client.get_run(run_id)

    def curves(self, run_id: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Each metric's (step, value) points, by step."""
        return metric_curves(self.uri, run_id, names)

    def last_trained_run(self, model_name: str):
        """The newest run of this registered model that finished and trained (older skips were runs of their own)."""
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{Tag.REGISTERED_MODEL}` = '{model_name}' and attributes.status = '{FINISHED}' "
            f"and tags.`{Tag.VERDICT}` != 'skip'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def named_pipeline_run(self, run_name: str):
        """The newest pipeline run whose config named it `run_name` (run.name), or None."""
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{Tag.KIND}` = 'pipeline' and tags.`{Tag.RUN_NAME}` = '{run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def stage_runs(self, parent_run_id: str) -> list:
        return stage_runs(self._client, self.experiment_id, parent_run_id)


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
        tags = {MlflowTag.PARENT_RUN: self.parent_run_id, Tag.STAGE: str(stage)}
        run_id = find_run(self._client, self.experiment_id, tags)
        if run_id is not None and self._client.get_run(run_id).info.status not in (RUNNING, FINISHED):
            self._client.update_run(run_id, status=RUNNING)  # the stage of an adopted run, interrupted
        if run_id is None:
            tags = {str(k): v for k, v in {**tags, Tag.METHOD: method}.items()}
            run_id = self._client.create_run(self.experiment_id, run_name=f"stage-{stage}", tags=tags).info.run_id
        return self.model_copy(update={"stage": stage, "stage_run_id": run_id})

    def log_params(self, params: dict) -> None:
        items = [Param(str(k), str(v)[:PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Each (metric, step) is recorded once: a resumed run redoes the steps after its last checkpoint and
        re-enters finished tasks, and its curves must not show those steps twice."""
        logged = logged_steps(self._client, self.run_id)
        fresh = {str(k): v for k, v in metrics.items() if (k, step) not in logged}
        if not fresh:
            return
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in fresh.items()])
        logged.update((k, step) for k in fresh)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, frame, artifact_file: str) -> None:
        """A JSON table the MLflow UI previews as a table (and the run's "evaluation" tab lists)."""
        self._client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_datasets(self, sources: list[tuple[str, str, str, str]]) -> None:
        """Each (file, name, digest, role) as an MLflow dataset input of the run: the UI lists them with the
        digest, and the role as the dataset's context."""
        from tasks.tracking.datasets import dataset_inputs

        self._client.log_inputs(self.run_id, datasets=dataset_inputs(sources))

    def log_mlflow_model(self, model_dir: str) -> None:
        """The run's model as an MLflow model in its artifacts (at MLFLOW_MODEL): a registered version's source."""
        with tempfile.TemporaryDirectory(prefix="mlflow-model-") as scratch:
            save_mlflow_model(model_dir, Path(scratch) / MLFLOW_MODEL)
            self.log_artifacts(Path(scratch) / MLFLOW_MODEL, MLFLOW_MODEL)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, str(key), str(value))

    def tags(self) -> dict[str, str]:
        return self._client.get_run(self.run_id).data.tags

    def metric_curves(self, names: list[str], run_id: str | None = None) -> dict[str, list[tuple[int, float]]]:
        return metric_curves(self.uri, run_id or self.run_id, names)

    def end(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status)
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
