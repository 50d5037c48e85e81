"""Normal retention: what a run keeps while it trains and once it is done. Checkpoints exist to resume the stage
in progress, so a stage keeps its newest sealed ones (and its best, which Trainer restores at the end) and
drops them all once the next stage has started from its verified final model; a finished run keeps what
`run.keep` says. Damaged checkpoints set aside on resume are not this module's: they are kept as evidence."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from transformers import TrainerCallback

from mixtune.core.logs import run_logger
from tasks.checkpoints import numbered, problem_with


def prune_checkpoints(checkpoints: Path, keep: int, best: str | None) -> list[Path]:
    """Delete all but the `keep` newest checkpoints and the best one; returns what went."""
    protected = {str(Path(best))} if best else set()
    doomed = [p for p in numbered(checkpoints)[keep:] if str(p) not in protected]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


class KeepCheckpoints(TrainerCallback):
    """Trainer's own rotation (save_total_limit) deletes the older checkpoint before the new one is sealed, so
    a kill in between would leave none to resume from. This runs after Seal: the old ones go only once a newer
    one is complete. List it after Seal."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            prune_checkpoints(Path(args.output_dir), self.keep, state.best_model_checkpoint)


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (0 when it is gone)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove(path: Path, why: str) -> int:
    """Delete a folder, logging it; returns the bytes freed."""
    if not path.exists():
        return 0
    size = folder_size(path)
    shutil.rmtree(path)
    run_logger().info("removed %s (%s): %s", path, human(size), why)
    return size


def release_stage(stage_folder: Path) -> int:
    """A stage's checkpoints, once its final model verifies: the next stage starts from that model, and a
    finished stage is never resumed. A final that does not verify keeps them (the stage is finished again)."""
    checkpoints, final = stage_folder / "checkpoints", stage_folder / "final"
    if not checkpoints.is_dir():
        return 0
    reason = problem_with(final)
    if reason:
        run_logger().warning("stage checkpoints in %s kept: the final model does not verify (%s)", stage_folder, reason)
        return 0
    return remove(checkpoints, "its stage finished and the next stage started from its final model")


@task(name="release-stage", task_run_name="release checkpoints of {stage_folder.name}")
def release_stage_task(stage_folder: Path) -> int:
    return release_stage(stage_folder)


def keep_after_run(run_folder: Path, keep: str, delivered: str | None) -> int:
    """What a finished run keeps (`run.keep`): returns the bytes freed. Records, plots and the delivered model
    are never touched, nor anything outside the run's folder."""
    if keep == "all":
        return 0
    freed = 0
    for stage in sorted(run_folder.glob("stage-*")):
        freed += remove(stage / "checkpoints", f"the run finished (run.keep: {keep})")
        final = stage / "final"
        if keep == "delivered" and final.is_dir() and (not delivered or final.resolve() != Path(delivered).resolve()):
            freed += remove(final, "not the delivered model (run.keep: delivered)")
    return freed


def human(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
