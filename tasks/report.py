"""Registering the run's final model, with the run-level plots, on the parent MLflow run and in Prefect."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from mixtune.config import PipelineConfig
from mixtune.logs import run_logger
from tasks import tracking
from tasks.champion import Verdict
from tasks.train import is_adapter, metric_name
from tasks.plots import data_uri, loss_plot, share_plot
from tasks.validate import Losses, StageReport, report_row, stage_curves


class RunSummary(BaseModel):
    parent_run_id: str
    tracking_uri: str
    experiment: str
    baseline: Losses | None = None  # None: the run was skipped, nothing was trained
    stages: list[StageReport] = []
    final_model: str | None = None
    final_stage: int = 0  # 0: the base model (no stage passed the gate)
    final_losses: Losses | None = None  # the final model's per-token validation losses
    stopped_reason: str | None = None
    plots: list[str] = []
    verdict: Verdict | None = None


def final_stage(reports: list[StageReport]) -> StageReport | None:
    """The best stage the gate let through (lowest domain val loss; the later one on a tie): a stage that
    breached the forgetting budget is never the final model."""
    passed = [r for r in reports if r.gate.decision == "continue"]
    return min(reversed(passed), key=lambda r: r.losses.domain) if passed else None


def publish_plots(uri: str, parent_run_id: str, reports: list[StageReport], baseline: Losses,
                  budget: float) -> list[Path]:
    if not reports:
        return []
    folder = Path(reports[0].model_dir).parents[1] / "plots"
    curves = [stage_curves(uri, r) for r in reports]
    paths = [share_plot(curves, folder / "domain_share.png"),
             loss_plot(curves, baseline.model_dump(), budget, folder / "loss_curves.png")]
    for path in paths:
        tracking.log_artifacts(uri, parent_run_id, path, "plots")
    return paths


def register_final(config: PipelineConfig, parent_run_id: str, reports: list[StageReport],
                   baseline: Losses, base_dir: str) -> RunSummary:
    """The best model so far becomes the run's final model: the best stage that passed the gate, or the
    base model itself when none did. The parent run stays open for the retraining verdict."""
    uri = tracking.tracking_uri(config)
    final = final_stage(reports)
    model_dir, stage, losses = (final.model_dir, final.stage, final.losses) if final else (base_dir, 0, baseline)
    stopped = next((r.gate.reason for r in reports if r.gate.decision == "stop"), None)
    guarded = [f"stage {r.stage}: {r.gate.decision}" for r in reports if r.gate.decision in ("hold", "back_off")]
    kind = "adapter" if is_adapter(model_dir) else "model"
    tracking.log_artifacts(uri, parent_run_id, model_dir, f"final_{kind}")
    tracking.log_metrics(uri, parent_run_id, {"final_domain_val_loss": losses.domain,
                                              "final_general_val_loss": losses.general}, step=stage)
    plots = publish_plots(uri, parent_run_id, reports, baseline, config.validation.forgetting_budget)
    speeds = [r.tokens_per_second for r in reports if r.tokens_per_second]
    if speeds:
        tracking.log_metrics(uri, parent_run_id, {"tokens_per_second": sum(speeds) / len(speeds)}, step=stage)
    tracking.set_tags(uri, parent_run_id, {"mixtune.final_stage": stage, "mixtune.method": config.train.method,
                                           "mixtune.schedule": " ".join(f"{r.target_share:.2f}" for r in reports),
                                           "mixtune.stopped_reason": stopped or "",
                                           "mixtune.guard_actions": "; ".join(guarded)})
    seen: dict[str, float] = {}
    for report in reports:
        for source, epochs in report.source_epochs.items():
            seen[source] = seen.get(source, 0.0) + epochs
        tracking.log_metrics(uri, parent_run_id, {
            "stage_domain_val_loss": report.losses.domain, "stage_general_val_loss": report.losses.general,
            "stage_realised_domain_share": report.realised_share,
            **{f"cumulative_epochs/{metric_name(s)}": e for s, e in seen.items()}}, step=report.stage)
    return RunSummary(parent_run_id=parent_run_id, tracking_uri=uri, experiment=config.tracking.experiment,
                      baseline=baseline, stages=reports, final_model=model_dir, final_stage=stage,
                      final_losses=losses, stopped_reason=stopped, plots=[str(p) for p in plots])


@task(name="register", retries=2, retry_delay_seconds=[2, 10])
def register_task(config: PipelineConfig, parent_run_id: str, reports: list[StageReport],
                  baseline: Losses, base_dir: str) -> RunSummary:
    summary = register_final(config, parent_run_id, reports, baseline, base_dir)
    which = f"stage {summary.final_stage}" if summary.final_stage else "the base model: no stage passed the gate"
    lines = [f"MLflow run `{parent_run_id}` in experiment `{summary.experiment}` ({summary.tracking_uri})", "",
             f"Final model: `{summary.final_model}` ({which})", ""]
    if summary.stopped_reason:
        lines.append(f"Stopped: {summary.stopped_reason}")
    lines += ["", "Plots (PNG, also in the MLflow run under `plots/`):", *[f"- `{p}`" for p in summary.plots]]
    create_markdown_artifact("\n".join(lines), key="final-model", description="The run's final model")
    for plot in map(Path, summary.plots):
        create_image_artifact(data_uri(plot), key=f"run-{plot.stem.replace('_', '-')}", description=plot.stem)
    create_table_artifact([report_row(r) for r in reports], key="stages", description="Per-stage summary")
    run_logger().info("final model: %s", summary.final_model)
    return summary
