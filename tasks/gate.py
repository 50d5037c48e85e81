"""The gate after each stage: go on, hold, back off or stop because general ability is being forgotten
(the rule is tasks/guard.py); the stage's run gets the decision, its loss curves, mix and model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from tasks import artifacts
from tasks.checkpoints import problem_with
from tasks.guard import GateDecision, ShareCursor, gate
from tasks.mlflow_names import Metric, Tag
from tasks.models import is_adapter
from tasks.plots import COLOURS, loss_plot, stage_curves
from tasks.records import ShareChoice, StageMix, StageReport, StageTraining, TokenLosses
from tasks.requests import StageRequest
from tasks.schedule import next_share
from tasks.tracking import Tracker


def stage_report(
    request: StageRequest,
    trained: StageTraining,
    losses: TokenLosses,
    cursor: ShareCursor,
    tasks: dict[str, float] | None = None,
) -> StageReport:
    """The gate's decision on the stage, judged against the request's baseline (which a gated stage has)."""
    config, mix, baseline = request.config, request.mix, request.baseline
    v = config.validation
    measured_on, general = losses.judged_general()
    if trained.breach_general:  # a stage stopped mid-way is judged by the breach, which training measured
        measured_on, general = "general", trained.breach_general
    decision = gate(
        general,
        getattr(baseline, measured_on),
        v.forgetting_budget,
        v.on_forgetting,
        cursor.actions,
        v.max_guard_actions,
        measured_on,
    )
    return StageReport(
        stage=mix.stage,
        target_share=mix.target_share,
        realised_share=mix.realised_share,
        source_epochs=mix.source_epochs,
        losses=losses,
        gate=decision,
        steps=trained.global_step,
        best_step=trained.best_step,
        stopped_early=trained.stopped_early,
        stop_reason=trained.stop_reason,
        tokens_per_second=trained.tokens_per_second,
        stage_dir=trained.stage_dir,
        model_dir=trained.model_dir,
        run_id=trained.run_id,
        next_share=steer(config, mix, losses, baseline, cursor, decision),
        task_metrics=tasks or {},
    )


def steer(
    config: PipelineConfig,
    mix: StageMix,
    losses: TokenLosses,
    baseline: TokenLosses,
    cursor: ShareCursor,
    decision: GateDecision,
) -> ShareChoice | None:
    """The adaptive ramp's share for the next stage; None for a fixed schedule, or when no stage follows."""
    if config.schedule.shape != "adaptive" or decision.decision == "stop" or mix.stage >= config.schedule.stages:
        return None
    return next_share(
        mix.target_share,
        decision.general_drift,
        (baseline.domain - losses.domain) / baseline.domain,
        config.validation.forgetting_budget,
        config.schedule,
        previous_drift=cursor.drift,
        previous_gain=cursor.gain,
    )


def record_share_choice(choice: ShareChoice, stage: int, step: int, tracker: Tracker) -> None:
    numbers = {
        "ramp/next_domain_share": choice.share,
        "ramp/budget_left": choice.budget_left,
        "ramp/added_drift": choice.added_drift,
        "ramp/stage_cost": choice.cost,
        "ramp/domain_gain": choice.gain,
        "ramp/added_domain_gain": choice.added_gain,
    }
    if choice.room is not None:
        numbers["ramp/room"] = choice.room
    tracker.log_metrics(numbers, step=step)
    tracker.set_tags({Tag.NEXT_SHARE: f"{choice.share:.4f}", Tag.NEXT_SHARE_REASON: choice.reason})
    run_logger().info("stage %d adaptive ramp: next share %.3f (%s)", stage, choice.share, choice.reason)


def record_gate(request: StageRequest, report: StageReport) -> Path:
    """The stage's run gets its decision, loss curves, mix manifest and model."""
    config, mix, baseline, tracker = request.config, request.mix, request.baseline, request.tracker
    curves = stage_curves(report, tracker.metric_curves(list(COLOURS)))
    plot = loss_plot(
        [curves], baseline.model_dump(), config.validation.forgetting_budget, Path(report.stage_dir) / "loss_curves.png"
    )
    tracker.log_artifacts(plot)
    drifts = {Metric.GENERAL_DRIFT: report.gate.general_drift}
    if report.losses.general_eval is not None:  # both, named: the split's drift, and the held-apart rows' one
        drifts[Metric.GENERAL_SPLIT_DRIFT] = report.losses.general / baseline.general - 1
        drifts[Metric.GENERAL_EVAL_DRIFT] = report.losses.general_eval / baseline.general_eval - 1
    tracker.log_metrics(drifts, step=report.steps)
    tracker.set_tags({Tag.DECISION: report.gate.decision, Tag.DECISION_REASON: report.gate.reason})
    if report.next_share is not None:
        record_share_choice(report.next_share, report.stage, report.steps, tracker)
    tracker.log_artifacts(mix.manifest, "mix")
    tracker.log_table(pd.read_parquet(mix.manifest), "mix/mix.json")  # parquet: MLflow shows no preview
    if config.tracking.log_models:
        tracker.log_artifacts(report.model_dir, "adapter" if is_adapter(report.model_dir) else "model")
    return plot


REPORT = "report.json"


def finished_stage(stage_dir: str | Path) -> StageReport | None:
    """The report of a stage that went through its gate before the run was interrupted: reused as it is, while
    its model still matches its manifest (a damaged one sends the stage through train again, which sets it
    aside and finishes the stage from its last good checkpoint)."""
    path = Path(stage_dir) / REPORT
    if not path.is_file():
        return None
    report = StageReport.model_validate_json(path.read_text())
    return None if problem_with(report.model_dir) else report


@task(name="gate", task_run_name="gate stage {request.mix.stage}", retries=2, retry_delay_seconds=[2, 10])
def gate_task(
    request: StageRequest,
    trained: StageTraining,
    losses: TokenLosses,
    cursor: ShareCursor,
    tasks: dict[str, float] | None = None,
) -> StageReport:
    report = stage_report(request, trained, losses, cursor, tasks)
    plot = record_gate(request, report)
    artifacts.image(
        f"stage-{report.stage}-loss-curves", plot, f"Stage {report.stage}: loss curves against the base model's"
    )
    run_logger().info("stage %d gate: %s (%s)", report.stage, report.gate.decision, report.gate.reason)
    artifacts.table(
        f"stage-{report.stage}",
        [artifacts.report_row(report)],
        f"Stage {report.stage}: target vs realised domain share, losses, decision",
    )
    staging = Path(report.stage_dir) / f"{REPORT}.tmp"
    staging.write_text(report.model_dump_json(indent=2))
    staging.replace(Path(report.stage_dir) / REPORT)  # written last and whole: the stage's done mark
    return report
