"""The `finetune` flow: the pipeline, in order. Each call is one retryable Prefect task that passes paths."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment, flow_run
from pydantic import ValidationError

from mixtune.core.config import ConfigError, PipelineConfig, resolve_paths
from mixtune.core.disk import DiskFull
from mixtune.core.logs import log_refusals_without_traceback, run_logger
from mixtune.core.names import RunName, generated_name
from mixtune.core.paths import run_dir, stage_dir, tracking_uri
from mixtune.core.policy import enforce, served_policy
from mixtune.core.preflight import Unreachable, check_tracking_server
from tasks.base_model import disk_need, pretrain_task, tokenizer_task
from tasks.champion import base_delivered_task, challenge_task, champion_task, crown_task
from tasks.collect import retention_task
from tasks.data_report import data_report_task
from tasks.distill import distill_task
from tasks.footprint import require_free_space
from tasks.gate import finished_stage, gate_task
from tasks.generation_check import generation_check_task
from tasks.ingest import ingest_task
from tasks.inputs import input_hash, input_tags, skip_task, unchanged_task
from tasks.interpolate import interpolate_task
from tasks.mix import mix_task
from tasks.plan import plan_task
from tasks.probes import probe_prompts
from tasks.readers import IngestError
from tasks.records import RunSummary, Verdict
from tasks.rehearse import planned_sizes, rehearse_task
from tasks.report import publish_task
from tasks.requests import RunRequest
from tasks.retention import release_stage_task
from tasks.schedule import advance, first_cursor
from tasks.tokenize import tokenize_task
from tasks.tracking import Tracker, end_runs_of_flow_run, leave_status, source_tags
from tasks.tracking_tasks import end_run_task, open_experiment_task, open_stage_task, start_tracking_task
from tasks.train import train_task
from tasks.validate import baseline_task, task_metrics_task, validate_task

PROBES_PER_SET = 3
log_refusals_without_traceback(ConfigError, IngestError, DiskFull, Unreachable)


def confine(config: PipelineConfig, is_deployment_run: bool) -> PipelineConfig:
    """A deployment's run gets the sections its deployment fixes, and may only use the tracking servers and
    read the folders the deployment allows."""
    policy = served_policy(is_deployment_run)
    return enforce(config, policy) if policy else config


def killed_by_signal(state) -> bool:
    """A crash from SIGTERM (Prefect raises TerminationSignal for it during a flow) or Ctrl-C: the run was
    killed, not failed. The local state carries the exception; a state read back from the API, the message."""
    message = (state.message or "").lower()
    return isinstance(state.data, (TerminationSignal, KeyboardInterrupt)) or "signal" in message


def end_tracking(status: str):
    """A Prefect state hook: whatever ends the flow run (failure, crash, cancellation), its MLflow runs end
    with `status` instead of staying RUNNING (KILLED for a crash a signal caused). Runs in the flow's process,
    or in the runner's on cancellation."""

    def hook(flow, flow_run, state) -> None:  # these names: Prefect's runner passes them as keywords
        ended = "KILLED" if state.is_crashed() and killed_by_signal(state) else status
        try:
            config = PipelineConfig.model_validate(flow_run.parameters["config"])
            config = confine(config, flow_run.deployment_id is not None)
        except (ValidationError, ConfigError):
            return  # parameters the flow refused: it never started an MLflow run, nor may it reach the server
        try:
            check_tracking_server(tracking_uri(config))  # a server that is down: say so now, not after retries
            end_runs_of_flow_run(config, str(flow_run.id), ended)
        except Exception as err:  # a hook must not hide the failure that called it
            recorded = leave_status(config, str(flow_run.id), ended)  # read by the next start on this host
            run_logger().warning(
                "could not end the MLflow runs of flow run %s %s: the tracking store is not writable (%s). They "
                "stay RUNNING: the next run of the same inputs on this host adopts them, as after a kill; any "
                "other run there ends them %s",
                flow_run.id,
                ended,
                err,
                ended if recorded else "KILLED",
            )

    hook.__name__ = f"end_mlflow_runs_{status.lower()}"  # how Prefect's log names it
    return hook


def pipeline_run_name() -> str:
    """The run's `name` parameter, else `<run.name>-<due time>-<end of the id>`; start_tracking_task may add more
    of the id if MLflow has the name already, and the flow run then takes that one (name_flow_run)."""
    given = flow_run.parameters.get("name")
    if given:  # Prefect renames a flow run to this at its start, whatever name it was created with
        return given
    config = flow_run.parameters.get("config")
    name = config.run.name if isinstance(config, PipelineConfig) else (config or {}).get("run", {}).get("name")
    return generated_name(name or "mixtune", flow_run.scheduled_start_time or datetime.now(UTC), flow_run.id)


def name_flow_run(name: str) -> None:
    if name != flow_run.name:
        run_logger().info("named %s: another run of the experiment is named %s", name, flow_run.name)
        with get_client(sync_client=True) as client:
            client.set_flow_run_name(flow_run.id, name)


@flow(
    name="finetune",
    flow_run_name=pipeline_run_name,
    on_failure=[end_tracking("FAILED")],
    on_crashed=[end_tracking("FAILED")],
    on_cancellation=[end_tracking("KILLED")],
)
def finetune(config: PipelineConfig, fresh: bool = False, name: RunName | None = None) -> RunSummary:
    """Check inputs against the last successful run; ingest, plan, pre-train a scratch model, then per stage:
    mix domain into general data, train, validate on domain and general data, and let the gate continue, hold,
    back off or stop. The final model then challenges the registered champion.

    A run of the same inputs whose process died is continued where it stopped, unless `fresh`.

    Args:
        config: The pipeline config (pipeline.yaml's sections).
        fresh: Start over even if an interrupted run of the same inputs could be continued.
        name: This run's name everywhere; empty: <run.name>-<due date>-<due time, UTC>-<end of the run's id>.
    """
    os.umask(0o077)  # databases, caches, quarantined rows and models: readable by their owner only
    config = confine(config, deployment.id is not None)
    config = resolve_paths(config, Path.cwd(), "flow parameter config")
    check_tracking_server(tracking_uri(config))
    experiment, digest = open_experiment_task(config), input_hash(config)
    previous = unchanged_task(config, experiment, digest)
    if previous:  # no parent run: the run it matched counts the tick (tasks/inputs.py)
        return RunSummary(
            parent_run_id=previous,
            tracking_uri=experiment.uri,
            experiment=config.tracking.experiment,
            verdict=skip_task(config, experiment, previous, flow_run.id),
        )
    require_free_space(disk_need(config))  # before any work: a full disk fails now, not mid-save
    tags = {**input_tags(config, digest), **source_tags(flow_run.ui_url, deployment.id is not None)}
    folder = str(run_dir(config.run.output_dir, config.run.name, flow_run.id))
    tracker = start_tracking_task(config, flow_run.id, tags, folder, None if fresh else digest, flow_run.name)
    if tracker.resumed:
        run_logger().info(
            "resuming interrupted run %s in %s: finished stages are reused, the interrupted one continues from "
            "its last good checkpoint",
            tracker.parent_run_id,
            tracker.run_folder,
        )
    if not tracker.resumed:  # a resumed run keeps the name it was started with
        name_flow_run(tracker.name)
    summary, challenge = run_pipeline(config, tracker)
    verdict = challenge() if challenge else summary.verdict  # none: the base was delivered, its verdict recorded
    end_run_task(tracker)
    # Last: only a FINISHED run may hold the champion. If another run of this pipeline (CLI, another deployment
    # or host) moved the alias since this challenge read it, nothing moves: the challenge meets the new champion.
    while challenge and not crown_task(config, tracker, verdict):
        verdict = challenge()
    summary = summary.model_copy(update={"verdict": verdict})
    # Then: the run has ended FINISHED, so no rerun adopts it and needs the stage finals this may delete.
    return retention_task(config, tracker.run_folder, summary)


def run_pipeline(config: PipelineConfig, tracker: Tracker) -> tuple[RunSummary, Callable[[], Verdict] | None]:
    """The trained run's summary, and its challenge of the champion (which the flow may have to repeat); no
    challenge when no stage passed the gate."""
    data = ingest_task(config)
    config = plan_task(config, {**data.stats, **planned_sizes(config, data.stats)}, tracker).config
    tokenizer_dir = tokenizer_task(config, data.samples, data.key)
    tokens = tokenize_task(
        data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir, config.data.overlong
    )
    from_base = config.data.rehearsal == "self" or config.data.self_distill  # data the base model writes
    if not from_base:  # reported before pre-training: a source over its quarantine limit fails fast
        data_report_task(config, tracker, data, tokens)
    base = pretrain_task(config, tokenizer_dir, tokens.pretrain, tokens.key)
    if config.data.rehearsal == "self":  # the general source is the base model's own answers, added as any source
        data = rehearse_task(config, data, base, tracker)
    if config.data.self_distill:  # the domain answers rewritten by the base model, the originals as reference
        data = distill_task(config, data, base, tracker)
    if from_base:
        tokens = tokenize_task(
            data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir, config.data.overlong
        )
        data_report_task(config, tracker, data, tokens)
    probes = probe_prompts(tokens.sft, data.samples, PROBES_PER_SET)
    baseline = baseline_task(config, base, tokens.sft, probes, tracker)
    base_tasks = task_metrics_task(config, base, base, tokens.sft, data.samples, tracker, 0)
    request = RunRequest(config=config, tracker=tracker, base_dir=base, sft_path=tokens.sft, baseline=baseline)

    run_folder = Path(tracker.run_folder)
    cursor, model, reports, previous = first_cursor(config.schedule), base, [], None
    while cursor.share is not None:
        folder = stage_dir(run_folder, cursor.stage)
        stage_run = open_stage_task(tracker, cursor.stage, config.train.method)
        report = finished_stage(folder)
        if report:
            run_logger().info("stage %d: finished before the interruption, reused (%s)", report.stage, folder)
            end_run_task(stage_run)
            reports.append(report)
            cursor, model, previous = advance(cursor, report), report.model_dir, folder
            continue
        mix = mix_task(
            tokens.sft,
            cursor.stage,
            cursor.share,
            config.schedule.samples_per_stage,
            config.mix_seed(),
            str(folder / "mix.parquet"),
            config.train.epochs,
        )
        if previous and config.run.keep != "all":  # this stage starts from its final: its checkpoints are done
            release_stage_task(previous)
        stage = request.stage(mix, model, str(folder), stage_run)
        trained = train_task(stage)
        losses = validate_task(config, trained, tokens.sft, base, probes, stage_run)
        tasks = task_metrics_task(config, trained.model_dir, base, tokens.sft, data.samples, stage_run, cursor.stage)
        said = generation_check_task(config, trained.model_dir, base, data.stats, str(folder), stage_run, cursor.stage)
        report = gate_task(stage, trained, losses, cursor, {**tasks, **said})
        end_run_task(stage_run)
        reports.append(report)
        cursor, model, previous = advance(cursor, report), trained.model_dir, folder
    # validation.interpolate: auto delivers base + alpha * (fine-tuned - base) within the budget; off: None
    blend = interpolate_task(request, reports)
    summary = publish_task(request, reports, base_tasks, blend)
    if summary.final_stage == 0:  # no stage passed the gate: the base model challenges no one, nor is registered
        return summary.model_copy(update={"verdict": base_delivered_task(config, tracker, tokens.sft)}), None

    def challenge() -> Verdict:
        champion, champion_sft = champion_task(config, tracker, tokens.sft), None
        if champion:  # the champion reads this run's validation conversations through its own tokenizer
            champion_sft = tokenize_task(
                data.samples, data.key, champion, config.model.max_seq_len, config.run.output_dir, config.data.overlong
            ).sft
        return challenge_task(request, summary.final_model, summary.final_losses, champion_sft)

    return summary, challenge
