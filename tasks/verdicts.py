"""A retraining verdict, recorded: tags, metrics and a markdown file in MLflow, an artifact in Prefect."""

from __future__ import annotations

from mixtune.core.logs import run_logger
from tasks import artifacts
from tasks.mlflow_names import Tag
from tasks.records import Verdict
from tasks.tracking import Tracker


def verdict_markdown(verdict: Verdict) -> str:
    lines = [
        f"# Retraining decision: **{verdict.decision}**",
        "",
        verdict.reason,
        "",
        f"Registered model `{verdict.model_name}`: alias `{verdict.alias}` is on version "
        f"{verdict.champion_version or '(none)'}"
        + (f"; this run's model is version {verdict.version}" if verdict.version else ""),
        "",
    ]
    if verdict.challenger:
        lines += ["| nats per byte | challenger | champion |", "|---|---|---|"]
        for tag in ("domain", "general"):
            champion = f"{getattr(verdict.champion, tag):.4f}" if verdict.champion else "-"
            lines.append(f"| {tag} val | {getattr(verdict.challenger, tag):.4f} | {champion} |")
    return "\n".join(lines) + "\n"


def record_verdict(tracker: Tracker, verdict: Verdict) -> None:
    tracker.set_tags(
        {
            Tag.VERDICT: verdict.decision,
            Tag.VERDICT_REASON: verdict.reason,
            Tag.MODEL_VERSION: verdict.version or "",
            Tag.CHAMPION_VERSION: verdict.champion_version or "",
        }
    )
    metrics = {
        f"{who}_{tag}_nats_per_byte": getattr(losses, tag)
        for who, losses in (("challenger", verdict.challenger), ("champion", verdict.champion))
        if losses
        for tag in ("domain", "general")
    }
    if metrics:
        tracker.log_metrics(metrics, step=0)
    text = verdict_markdown(verdict)
    tracker.log_text(text, "verdict.md")
    artifacts.markdown("retrain-verdict", text, f"Retraining: {verdict.decision}")
    run_logger().info("retraining: %s (%s)", verdict.decision, verdict.reason)
