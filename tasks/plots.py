"""What the user sees: target vs realised domain share, and loss curves across stages with the base
model's baselines and the gate's decisions. Pure matplotlib on numbers; tracking gathers the numbers."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from tasks.mlflow_names import Metric, val_loss  # noqa: E402
from tasks.records import StageReport  # noqa: E402

COLOURS = {Metric.TRAIN_LOSS: "#999999", Metric.DOMAIN_VAL_LOSS: "#d62728", Metric.GENERAL_VAL_LOSS: "#1f77b4"}
LABELS = {Metric.TRAIN_LOSS: "train", Metric.DOMAIN_VAL_LOSS: "domain val", Metric.GENERAL_VAL_LOSS: "general val"}


class StageCurves(BaseModel):
    stage: int
    steps: int
    decision: str
    target_share: float
    realised_share: float
    curves: dict[str, list[tuple[int, float]]]  # metric -> (step within the stage, value)


def share_plot(stages: list[StageCurves], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = [s.stage for s in stages]
    ax.plot(
        x,
        [s.target_share for s in stages],
        "o--",
        color="#555555",
        markersize=11,
        markerfacecolor="none",
        label="target",
    )
    ax.plot(x, [s.realised_share for s in stages], "s-", color="#d62728", label="realised")
    for s in stages:
        ax.annotate(
            s.decision, (s.stage, s.realised_share), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8
        )
    ax.set(xlabel="stage", ylabel="domain share", ylim=(0, 1.05), xticks=x, title="Domain share per stage")
    ax.legend(loc="upper left")
    return save(fig, path)


def loss_plot(stages: list[StageCurves], baselines: dict[str, float], budget: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    offset = 0
    for s in stages:
        for metric, points in s.curves.items():
            if points:
                steps, values = zip(*points)
                ax.plot(
                    [offset + p for p in steps],
                    values,
                    color=COLOURS[metric],
                    label=LABELS[metric] if s is stages[0] else None,
                    marker="." if metric != Metric.TRAIN_LOSS else None,
                )
        offset += s.steps
        ax.axvline(offset, color="#cccccc", linestyle="--", linewidth=1)
        ax.text(offset, ax.get_ylim()[1], f" {s.stage}: {s.decision}", rotation=90, va="top", ha="right", fontsize=7)
    for tag in ("domain", "general"):  # the curves are of these sets (general_eval is measured at stage ends)
        value = baselines[tag]
        ax.axhline(value, color=COLOURS[val_loss(tag)], linestyle=":", linewidth=1, label=f"base model, {tag} val")
    ax.axhline(
        baselines["general"] * (1 + budget),
        color=COLOURS[Metric.GENERAL_VAL_LOSS],
        linestyle="--",
        linewidth=1,
        alpha=0.6,
        label=f"forgetting budget (+{budget:.0%})",
    )
    ax.set(xlabel="training step (stages end at the dashed lines)", ylabel="loss", title="Loss across stages")
    ax.legend(fontsize=8, loc="upper right")
    return save(fig, path)


def data_uri(path: Path) -> str:
    """The PNG inline, so a Prefect image artifact shows it without a server to fetch it from."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_curves(report: StageReport, curves: dict[str, list[tuple[int, float]]]) -> StageCurves:
    return StageCurves(
        stage=report.stage,
        steps=report.steps,
        decision=report.gate.decision,
        target_share=report.target_share,
        realised_share=report.realised_share,
        curves=curves,
    )
