"""A flow run's parent run: started, found again on a retry, adopted from a dead process, ended on failure."""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from pathlib import Path

from mlflow.tracking import MlflowClient

from mixtune.core.config import PipelineConfig
from mixtune.core.names import generated_name, name_candidates
from mixtune.core.paths import tracking_uri
from tasks.mlflow_names import MlflowTag, Tag
from tasks.tracking.locks import hold_lock, lock_path, owner_is_gone, pending_status, release_lock
from tasks.tracking.runs import Experiment, Tracker
from tasks.tracking.store import KILLED, RUNNING, client_for, experiment_id, find_run, flatten, stage_runs


def open_experiment(config: PipelineConfig) -> Experiment:
    client = client_for(tracking_uri(config))
    return Experiment(uri=client.tracking_uri, experiment_id=experiment_id(client, config))


def find_experiment(uri: str, name: str) -> Experiment | None:
    """The experiment `name` at `uri` if it exists (nothing is created)."""
    found = client_for(uri).get_experiment_by_name(name)
    return Experiment(uri=uri, experiment_id=found.experiment_id) if found else None


def registry_at(uri: str) -> Experiment:
    """A handle on the model registry of `uri` alone, for callers that read no experiment's runs."""
    return Experiment(uri=client_for(uri).tracking_uri, experiment_id="")


def source_tags(flow_run_url: str | None, deployed: bool) -> dict[str, str]:
    """What MLflow's UI shows as Source and Created by, and the description linking the Prefect flow run."""
    tags = {
        MlflowTag.SOURCE_NAME: "mixtune finetune flow",
        MlflowTag.SOURCE_TYPE: "JOB" if deployed else "LOCAL",
        MlflowTag.USER: getpass.getuser(),
    }
    if flow_run_url:
        tags[Tag.PREFECT_FLOW_RUN_URL] = flow_run_url
        tags[MlflowTag.NOTE] = f"Prefect flow run: [{flow_run_url}]({flow_run_url})"
    return {str(k): v for k, v in tags.items()}


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
    found = find_run(client, exp_id, {Tag.FLOW_RUN: flow_run_id})
    if found:
        hold_lock(found, lock)
        return own(tracker, client.get_run(found))
    adopted = adopt_unfinished_run(client, exp_id, input_hash, flow_run_id, lock) if input_hash else None
    end_abandoned_runs(client, exp_id)
    if adopted:
        return own(tracker, adopted).model_copy(update={"resumed": True})
    tags = {
        **(tags or {}),
        Tag.FLOW_RUN: flow_run_id,
        Tag.KIND: "pipeline",
        Tag.RUN_NAME: config.run.name,
        Tag.METHOD: config.train.method,
        Tag.HOST: socket.gethostname(),
        Tag.LOCK: str(lock),
        Tag.RUN_FOLDER: run_folder,
    }
    wanted = name or generated_name(config.run.name, datetime.now(UTC), flow_run_id)
    tags = {str(k): v for k, v in tags.items()}
    run = client.create_run(exp_id, run_name=free_name(client, exp_id, wanted, flow_run_id), tags=tags)
    hold_lock(run.info.run_id, lock)
    tracker = tracker.model_copy(update={"parent_run_id": run.info.run_id, "name": run.info.run_name})
    tracker.log_params(flatten(config.public_dump()))
    return tracker


def own(tracker: Tracker, run) -> Tracker:
    folder = run.data.tags.get(Tag.RUN_FOLDER) or tracker.run_folder
    return tracker.model_copy(
        update={"parent_run_id": run.info.run_id, "run_folder": folder, "name": run.info.run_name}
    )


def free_name(client: MlflowClient, exp_id: str, wanted: str, flow_run_id: str) -> str:
    """The first of `wanted`'s candidates no pipeline run of the experiment holds."""
    candidates = name_candidates(wanted, flow_run_id)
    return next(
        (c for c in candidates if not find_run(client, exp_id, {Tag.KIND: "pipeline", MlflowTag.RUN_NAME: c})),
        candidates[-1],
    )


def adopt_unfinished_run(client: MlflowClient, exp_id: str, input_hash: str, flow_run_id: str, lock: Path):
    """The newest parent run of this host with the same inputs hash whose process died before it ended: it
    becomes this flow run's (RUNNING again, its tags pointing at this process), so the pipeline continues in
    its folder. Other hosts' runs are left alone: their locks cannot be seen from here."""
    query = (
        f"tags.`{Tag.KIND}` = 'pipeline' and tags.`{Tag.HOST}` = '{socket.gethostname()}' "
        f"and tags.`{Tag.INPUT_HASH}` = '{input_hash}'"
    )
    for run in client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"]):
        tags, status = run.data.tags, run.info.status
        abandoned = (status == RUNNING and owner_is_gone(tags.get(Tag.LOCK, ""))) or (
            status == KILLED and tags.get(Tag.ABANDONED) == "true"
        )
        if not abandoned or not tags.get(Tag.RUN_FOLDER):
            continue
        previous = [tags[key] for key in (Tag.RESUMED, Tag.FLOW_RUN) if tags.get(key)]
        hold_lock(run.info.run_id, lock)
        client.update_run(run.info.run_id, status=RUNNING)
        for key, value in {Tag.FLOW_RUN: flow_run_id, Tag.LOCK: str(lock), Tag.RESUMED: ",".join(previous)}.items():
            client.set_tag(run.info.run_id, str(key), value)
        if tags.get(Tag.ABANDONED):
            client.delete_tag(run.info.run_id, str(Tag.ABANDONED))
        return client.get_run(run.info.run_id)
    return None


def end_abandoned_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """Parent runs of this host left RUNNING by a process that no longer exists end with their stages: FAILED
    when the process failed but could not tell MLflow (the server was down; it left the status in its lock
    file), else KILLED. Runs of other hosts are left to them: their locks cannot be seen from here."""
    query = f"attributes.status = '{RUNNING}' and tags.`{Tag.HOST}` = '{socket.gethostname()}'"
    ended = []
    for run in client.search_runs([exp_id], filter_string=query):
        lock = run.data.tags.get(Tag.LOCK)
        if lock and owner_is_gone(lock):
            end_open_runs(client, run.info.run_id, pending_status(Path(lock)))
            client.set_tag(run.info.run_id, str(Tag.ABANDONED), "true")
            ended.append(run.info.run_id)
    return ended


def end_open_runs(client: MlflowClient, parent_id: str, status: str) -> None:
    """On failure: the parent and any stage still RUNNING end with `status`, never left RUNNING."""
    exp_id = client.get_run(parent_id).info.experiment_id
    for run in [*stage_runs(client, exp_id, parent_id), client.get_run(parent_id)]:
        if run.info.status == RUNNING:
            client.set_terminated(run.info.run_id, status)
    release_lock(parent_id)


def end_runs_of_flow_run(config: PipelineConfig, flow_run_id: str, status: str) -> str | None:
    client = client_for(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    parent = experiment and find_run(client, experiment.experiment_id, {Tag.FLOW_RUN: flow_run_id})
    if parent:
        end_open_runs(client, parent, status)
    return parent
