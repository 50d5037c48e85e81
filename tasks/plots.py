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
from tasks.records import AlphaPoint, StageReport  # noqa: E402

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


def interpolation_plot(points: list[AlphaPoint], budget: float, chosen: float, path: Path) -> Path:
    """Domain gain and general drift against alpha, on the half that chose and the half that confirmed, for
    the stage interpolated over the grid (the first points)."""
    grid = [p for p in points if p.stage == points[0].stage]
    alphas = [p.alpha for p in grid]
    fig, ax = plt.subplots(figsize=(7, 4))
    for half, style in (("choose", "o-"), ("confirm", "s--")):
        gains = [getattr(p, f"{half}_gain") for p in grid]
        drifts = [getattr(p, f"{half}_drift") for p in grid]
        ax.plot(alphas, gains, style, color=COLOURS["domain_val_loss"], label=f"domain gain ({half} half)")
        ax.plot(alphas, drifts, style, color=COLOURS["general_val_loss"], label=f"general drift ({half} half)")
    ax.axhline(budget, color=COLOURS["general_val_loss"], linestyle=":", label=f"forgetting budget (+{budget:.0%})")
    ax.axvline(chosen, color="#555555", linestyle="--", linewidth=1, label=f"delivered: alpha {chosen:g}")
    ax.set(
        xlabel=f"alpha: base + alpha * (stage {grid[0].stage} - base)",
        ylabel="relative to the base model",
        title="Interpolation toward the base",
    )
    ax.legend(fontsize=8, loc="best")
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
