"""The disk a run will need, estimated before it starts from the model's parameter count, and the refusal to
start when the output folder's file system has less free. Weights are saved in fp32 (training keeps fp32
master weights, bf16 or not); AdamW's state is two fp32 moments per trained parameter."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mixtune.core.config import PipelineConfig
from mixtune.core.disk import free_bytes
from mixtune.core.logs import run_logger
from mixtune.core.paths import default_tracking_uri, tracking_uri
from tasks.retention import human

FP32 = 4
ADAM_MOMENTS = 2
PRETRAIN_CHECKPOINTS = 3  # pre-training keeps two sealed checkpoints and writes a third (tasks/base_model.py)


class DiskSpaceError(RuntimeError):
    """The run would fill its output folder's disk: refused before any work."""


class DiskNeed(BaseModel):
    folder: str
    parts: dict[str, int]  # what needs the space, in bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def text(self) -> str:
        parts = ", ".join(f"{name} {human(size)}" for name, size in self.parts.items() if size)
        return f"about {human(self.total)} in {self.folder} ({parts})"


def estimate(config: PipelineConfig, parameters: int, trained: int, pretrains: bool) -> DiskNeed:
    """The most the run holds at once: every stage's final model (the delivered one is chosen at the end), the
    checkpoints of the stage in progress (those kept, the best, and the one being written), the base model
    and its pre-training checkpoints when it is built, and MLflow's copies when its store is in the folder."""
    t, stages = config.train, config.schedule.stages
    weights, final = parameters * FP32, trained * FP32
    checkpoint = final + trained * FP32 * ADAM_MOMENTS
    in_flight = (t.keep_checkpoints + 2) * checkpoint
    if config.run.keep == "all":  # every stage's last checkpoints stay
        in_flight = stages * (t.keep_checkpoints + 1) * checkpoint + checkpoint
    training = max(in_flight, PRETRAIN_CHECKPOINTS * weights * (1 + ADAM_MOMENTS) if pretrains else 0)
    parts = {
        "stage final models": stages * final,
        "checkpoints (weights + optimizer state)": training,
        "base model": weights if pretrains else 0,
        "merged model": weights if t.method == "lora" else 0,
        "interpolated model": weights if config.validation.interpolate == "auto" else 0,
    }
    if tracking_uri(config) == default_tracking_uri(config.run.output_dir):  # artifacts under output_dir
        logged_stages = stages * final if config.tracking.log_models else 0
        parts["logged models (MLflow)"] = logged_stages + 2 * weights + (final if t.method == "lora" else 0)
    return DiskNeed(folder=config.run.output_dir, parts=parts)


def require_free_space(need: DiskNeed) -> None:
    free = free_bytes(Path(need.folder))  # a first run's output folder is not made yet: its nearest parent
    if free < need.total:
        raise DiskSpaceError(
            f"not enough free disk for this run: it needs {need.text()}, and {human(free)} is free there. Free "
            "space (`mixtune gc` removes old runs' outputs), point run.output_dir elsewhere, or need less "
            "(run.keep, train.keep_checkpoints, tracking.log_models, fewer schedule.stages)."
        )
    run_logger().info("disk: the run needs %s; %s free", need.text(), human(free))
