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
from tasks.guard import ShareCursor, gate
from tasks.models import is_adapter
from tasks.plots import COLOURS, loss_plot, stage_curves
from tasks.records import StageMix, StageReport, StageTraining, TokenLosses
from tasks.tracking import Tracker


def stage_report(
    config: PipelineConfig,
    mix: StageMix,
    trained: StageTraining,
    losses: TokenLosses,
    baseline: TokenLosses,
    cursor: ShareCursor,
) -> StageReport:
    v = config.validation
    return StageReport(
        stage=mix.stage,
        target_share=mix.target_share,
        realised_share=mix.realised_share,
        source_epochs=mix.source_epochs,
        losses=losses,
        # A stage stopped mid-way for forgetting is judged by the breach, not by the checkpoint it kept.
        gate=gate(
            trained.breach_general or losses.general,
            baseline.general,
            v.forgetting_budget,
            v.on_forgetting,
            cursor.actions,
            v.max_guard_actions,
        ),
        steps=trained.global_step,
        best_step=trained.best_step,
        stopped_early=trained.stopped_early,
        stop_reason=trained.stop_reason,
        tokens_per_second=trained.tokens_per_second,
        stage_dir=trained.stage_dir,
        model_dir=trained.model_dir,
        run_id=trained.run_id,
    )


def record_gate(
    config: PipelineConfig, report: StageReport, mix: StageMix, baseline: TokenLosses, tracker: Tracker
) -> Path:
    """The stage's run gets its decision, loss curves, mix manifest and model."""
    curves = stage_curves(report, tracker.metric_curves(list(COLOURS)))
    plot = loss_plot(
        [curves], baseline.model_dump(), config.validation.forgetting_budget, Path(report.stage_dir) / "loss_curves.png"
    )
    tracker.log_artifacts(plot)
    tracker.log_metrics({"general_drift": report.gate.general_drift}, step=report.steps)
    tracker.set_tags({"mixtune.decision": report.gate.decision, "mixtune.decision_reason": report.gate.reason})
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


@task(name="gate", task_run_name="gate stage {mix.stage}", retries=2, retry_delay_seconds=[2, 10])
def gate_task(
    config: PipelineConfig,
    mix: StageMix,
    trained: StageTraining,
    losses: TokenLosses,
    baseline: TokenLosses,
    cursor: ShareCursor,
    tracker: Tracker,
) -> StageReport:
    report = stage_report(config, mix, trained, losses, baseline, cursor)
    plot = record_gate(config, report, mix, baseline, tracker)
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
