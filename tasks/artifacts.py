"""Prefect artifacts, in one place: what the Prefect UI shows of a run (tables, markdown, images)."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from tasks.records import StageReport


def markdown(key: str, text: str, description: str) -> None:
    create_markdown_artifact(text, key=key, description=description)


def link(key: str, url: str, text: str, description: str) -> None:
    create_link_artifact(url, link_text=text, key=key, description=description)


def image(key: str, path: Path, description: str) -> None:
    from tasks.plots import data_uri  # matplotlib: not for the skip check, which draws nothing

    create_image_artifact(data_uri(path), key=key, description=description)


def table(key: str, rows: list[dict], description: str) -> None:
    create_table_artifact(rows, key=key, description=description)


def report_row(report: StageReport) -> dict:
    return {
        "stage": report.stage,
        "target share": f"{report.target_share:.3f}",
        "realised share": f"{report.realised_share:.3f}",
        "domain val loss": f"{report.losses.domain:.4f}",
        "general val loss": f"{report.losses.general:.4f}",
        "general drift": f"{report.gate.general_drift:+.1%}",
        "steps": report.steps,
        "best step": "-" if report.best_step is None else report.best_step,
        "stopped early": report.stop_reason or "",
        "decision": report.gate.decision,
        "reason": report.gate.reason,
        **{name.removeprefix("task/"): f"{value:.3f}" for name, value in report.task_metrics.items()},
        **({"next share": f"{report.next_share.share:.3f} ({report.next_share.reason})"} if report.next_share else {}),
    }
