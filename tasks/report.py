"""Publishing the run's final model, with the run-level plots, on the parent MLflow run and in Prefect.
(Registering it in the model registry is the challenge's job: tasks/champion.py.)"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mixtune.core.logs import run_logger
from mixtune.core.paths import plots_dir
from tasks import artifacts
from tasks.mlflow_names import FINAL, Metric, Tag, val_loss
from tasks.models import is_adapter
from tasks.plots import COLOURS, loss_plot, share_plot, stage_curves
from tasks.records import Interpolation, RunSummary, StageReport, TokenLosses
from tasks.requests import RunRequest
from tasks.tracking import Tracker, metric_name


def final_stage(reports: list[StageReport]) -> StageReport | None:
    """The best stage the gate let through (lowest domain val loss; the later one on a tie): a stage that
    breached the forgetting budget is never the final model."""
    passed = [r for r in reports if r.gate.decision == "continue"]
    return min(reversed(passed), key=lambda r: r.losses.domain) if passed else None


def publish_plots(
    tracker: Tracker, reports: list[StageReport], baseline: TokenLosses, budget: float, folder: Path
) -> list[Path]:
    if not reports:
        return []
    curves = [stage_curves(r, tracker.metric_curves(list(COLOURS), r.run_id)) for r in reports]
    paths = [
        share_plot(curves, folder / "domain_share.png"),
        loss_plot(curves, baseline.model_dump(), budget, folder / "loss_curves.png"),
    ]
    for path in paths:
        tracker.log_artifacts(path, "plots")
    return paths


def log_stage_history(tracker: Tracker, reports: list[StageReport]) -> None:
    seen: dict[str, float] = {}
    for report in reports:
        for source, epochs in report.source_epochs.items():
            seen[source] = seen.get(source, 0.0) + epochs
        tracker.log_metrics(
            {
                Metric.STAGE_DOMAIN_VAL_LOSS: report.losses.domain,
                Metric.STAGE_GENERAL_VAL_LOSS: report.losses.general,
                "stage_realised_domain_share": report.realised_share,
                **{f"cumulative_epochs/{metric_name(s)}": e for s, e in seen.items()},
            },
            step=report.stage,
        )


def publish_final(
    request: RunRequest,
    reports: list[StageReport],
    base_tasks: dict[str, float] | None = None,
    interpolation: Interpolation | None = None,
) -> RunSummary:
    """The best model so far becomes the run's final model: the best stage that passed the gate, or the
    base model itself when none did; with validation.interpolate, the interpolation it chose."""
    config, tracker, baseline, base_dir = request.config, request.tracker, request.baseline, request.base_dir
    final = final_stage(reports)
    model_dir, stage, losses = (final.model_dir, final.stage, final.losses) if final else (base_dir, 0, baseline)
    final_tasks = final.task_metrics if final else base_tasks or {}
    if interpolation:
        model_dir, stage, losses = interpolation.model_dir, interpolation.stage, interpolation.losses
        final_tasks = delivered_tasks(reports, interpolation, base_tasks or {})
    stopped = next((r.gate.reason for r in reports if r.gate.decision == "stop"), None)
    guarded = [f"stage {r.stage}: {r.gate.decision}" for r in reports if r.gate.decision in ("hold", "back_off")]
    kind = "adapter" if is_adapter(model_dir) else "model"
    tracker.log_artifacts(model_dir, f"final_{kind}")
    finals = {FINAL + val_loss(tag): value for tag, value in losses.model_dump(exclude_none=True).items()}
    tracker.log_metrics(finals, step=stage)
    if final_tasks:  # `mixtune compare` reads the delivered model's task metrics from these
        tracker.log_metrics({FINAL + name: value for name, value in final_tasks.items()}, step=stage)
    plots = publish_plots(
        tracker, reports, baseline, config.validation.forgetting_budget, plots_dir(tracker.run_folder)
    )
    speeds = [r.tokens_per_second for r in reports if r.tokens_per_second]
    if speeds:
        tracker.log_metrics({Metric.TOKENS_PER_SECOND: sum(speeds) / len(speeds)}, step=stage)
    tracker.set_tags(
        {
            Tag.FINAL_STAGE: stage,
            Tag.METHOD: config.train.method,
            Tag.SCHEDULE: " ".join(f"{r.target_share:.2f}" for r in reports),
            Tag.STOPPED_REASON: stopped or "none: every planned stage ran",  # an empty tag reads as broken
            Tag.GUARD_ACTIONS: "; ".join(guarded) or "none",
        }
    )
    log_stage_history(tracker, reports)
    return RunSummary(
        parent_run_id=tracker.parent_run_id,
        tracking_uri=tracker.uri,
        experiment=config.tracking.experiment,
        baseline=baseline,
        baseline_tasks=base_tasks or {},
        stages=reports,
        final_model=model_dir,
        final_stage=stage,
        final_losses=losses,
        stopped_reason=stopped,
        plots=[str(p) for p in plots],
        interpolation=interpolation,
    )


def delivered_tasks(reports: list[StageReport], interpolation: Interpolation, base_tasks: dict) -> dict:
    """Task metrics that hold for the interpolated weights: the stage's own at alpha 1, the base's at alpha 0;
    none between (not measured)."""
    if interpolation.alpha == 0:
        return base_tasks
    if interpolation.alpha == 1:
        return next(r.task_metrics for r in reports if r.stage == interpolation.stage)
    return {}


def summary_markdown(summary: RunSummary, run_url: str | None) -> str:
    which = f"stage {summary.final_stage}" if summary.final_stage else "the base model: no stage passed the gate"
    run = f"[{summary.parent_run_id}]({run_url})" if run_url else f"`{summary.parent_run_id}`"
    lines = [
        f"MLflow run {run} in experiment `{summary.experiment}` ({summary.tracking_uri})",
        "",
        f"Final model: `{summary.final_model}` ({which})",
        "",
    ]
    if summary.stopped_reason:
        lines.append(f"Stopped: {summary.stopped_reason}")
    if summary.interpolation:
        lines.append(f"Interpolated toward the base: {summary.interpolation.reason}")
    lines += ["", "Plots (PNG, also in the MLflow run under `plots/`):", *[f"- `{p}`" for p in summary.plots]]
    return "\n".join(lines)


@task(name="publish", task_run_name="publish", retries=2, retry_delay_seconds=[2, 10])
def publish_task(
    request: RunRequest,
    reports: list[StageReport],
    base_tasks: dict[str, float] | None = None,
    interpolation: Interpolation | None = None,
) -> RunSummary:
    summary = publish_final(request, reports, base_tasks, interpolation)
    tracker = request.tracker
    artifacts.markdown(
        "final-model", summary_markdown(summary, tracker.run_url(tracker.parent_run_id)), "The run's final model"
    )
    for plot in map(Path, summary.plots):
        artifacts.image(f"run-{plot.stem.replace('_', '-')}", plot, plot.stem)
    artifacts.table("stages", [artifacts.report_row(r) for r in reports], "Per-stage summary")
    run_logger().info("final model: %s", summary.final_model)
    return summary
