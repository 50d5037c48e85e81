"""Checkpoints that can be trusted: each is sealed with a manifest of sha256 per file once it is complete, and
resume only trusts a checkpoint whose manifest matches and whose files load. Anything else is set aside
(moved out of the way, deleted only when the disk runs short) with the file and the reason, and the previous one
is tried.

Trainer writes a checkpoint into `checkpoint-N` itself (its best-checkpoint tracking and rotation name that
folder), so the manifest is the commit mark: it is written last, through a temporary file and an atomic
rename; a folder without one was interrupted while being written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals

from mixtune.core.disk import free_bytes, space_for

MANIFEST = "manifest.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


KIND_FILE = "mixtune.json"  # in a delivered model folder: what it holds ("model" or "adapter") and how it was made


def write_kind(folder: Path, kind: str, **about) -> None:
    (folder / KIND_FILE).write_text(json.dumps({"kind": kind, **about}))


def seal(folder: str | Path) -> None:
    """Write the manifest of every file now in `folder`; the rename makes it appear whole or not at all."""
    folder = Path(folder)
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    staging = folder / f"{MANIFEST}.tmp"
    staging.write_text(json.dumps({"sha256": files}, indent=2))
    os.replace(staging, folder / MANIFEST)


def load_check(path: Path) -> None:
    """Parse the file the way resume will, so a file that matches its digest but cannot load is caught here.
    Pickle-format files go through torch's weights-only loader, with the numpy types Trainer's own RNG-state
    load allows (rng_state.pth holds numpy's generator state): no code runs from a checkpoint."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # safe_open's handle is not iterable
            for name in names:
                handle.get_slice(name)
    elif path.suffix in {".pt", ".pth"}:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".json":
        json.loads(path.read_text())


# Trainer writes training_args.bin as a pickle for people to inspect; it never reads it back on resume.
NOT_LOADED = {"training_args.bin"}


def problem_with(folder: str | Path) -> str | None:
    """Why `folder` must not be trusted, naming the file; None when every file matches its manifest and loads."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest}: missing (the folder was not completely written)"
    try:
        files = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest}: unreadable ({err})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if sha256(path) != expected:
            return f"{path}: sha256 does not match the manifest (damaged after it was written)"
        if name in NOT_LOADED:
            continue
        try:
            load_check(path)
        except Exception as err:  # any parser's error means the same here: this file cannot be resumed from
            return f"{path}: does not load ({type(err).__name__}: {err})"
    return None


def set_aside(folder: Path, into: Path, reason: str, warn: Callable[..., None]) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    target = into / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 1_000_000:06d}"
    folder.rename(target)
    warn("set aside %s as %s: %s", folder, target, reason)
    return target


def numbered(checkpoints: Path) -> list[Path]:
    """Checkpoint folders, newest (highest step) first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def last_good_checkpoint(checkpoints: Path, aside: Path, warn: Callable[..., None]) -> str | None:
    """The newest checkpoint that verifies. Newer ones that do not are set aside, so Trainer never sees them;
    with none left the caller starts from its initial weights."""
    rejected = 0
    for folder in numbered(checkpoints):
        reason = problem_with(folder)
        if reason is None:
            return str(folder)
        set_aside(folder, aside, reason, warn)
        rejected += 1
    if rejected:
        warn("no good checkpoint left in %s: starting again from the initial weights", checkpoints)
    return None


class Seal(TrainerCallback):
    """Seals each checkpoint after every other on_save callback has added its files (list it last). With several
    processes, each writes its own RNG state into the checkpoint: the first seals it once all have."""

    def on_save(self, args, state, control, **kwargs):
        wait_for_every_process()
        if state.is_world_process_zero:
            seal(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        wait_for_every_process()


def wait_for_every_process() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# Running out of disk: checkpoints the stage can no longer use are freed, so a rerun has the room.


def checkpoint_bytes(model) -> int:
    """About what one checkpoint takes: the saved weights (a LoRA adapter's alone) and AdamW's two fp32 moments
    of every trained weight."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = trained if hasattr(model, "peft_config") else sum(p.numel() for p in model.parameters())
    return saved * 4 + 2 * trained * 4


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def remove(folder: Path, why: str, warn: Callable[..., None]) -> int:
    size = folder_bytes(folder)
    shutil.rmtree(folder, ignore_errors=True)
    warn("removed %s (%.1f MB): %s", folder, size / 2**20, why)
    return size


def free_checkpoint_space(checkpoints: Path, aside: Path, warn: Callable[..., None]) -> int:
    """On a full disk: checkpoints never sealed (cut off mid-write) and every set-aside one are removed, oldest
    set-aside first; sealed checkpoints stay, for the rerun to continue from. Returns the bytes freed."""
    unsealed = [f for f in numbered(checkpoints) if not (f / MANIFEST).is_file()]
    freed = sum(remove(f, "never sealed, and the disk is full", warn) for f in unsealed)
    old_first = sorted(aside.iterdir(), key=lambda p: p.stat().st_mtime) if aside.is_dir() else []
    return freed + sum(remove(f, "set aside, and the disk is full", warn) for f in old_first if f.is_dir())


def make_room(checkpoints: Path, aside: Path, needed: int, warn: Callable[..., None]) -> None:
    """Before a stage trains: with less than one checkpoint's worth of space free, set-aside checkpoints are
    removed (they are kept for inspection only while the space allows)."""
    if free_bytes(checkpoints) < needed and aside.is_dir() and any(aside.iterdir()):
        free_checkpoint_space(checkpoints, aside, warn)


def space_for_checkpoints(
    target: Path, what: str, needed: int, checkpoints: Path, aside: Path, warn: Callable[..., None]
):
    """A full disk while writing `target` fails as one DiskFull naming it, once the checkpoints in `checkpoints`
    and `aside` that can no longer be used (cut off mid-write, set aside) are freed for the rerun."""
    return space_for(target, what, needed, lambda: free_checkpoint_space(checkpoints, aside, warn))


def space_in_stage(stage_dir: Path, target: Path, what: str, needed: int, warn: Callable[..., None]):
    """space_for_checkpoints for a write into a stage's folder: a full disk there frees the stage's own unusable
    checkpoints, whichever of its writes meets the full disk first."""
    return space_for_checkpoints(target, what, needed, stage_dir / "checkpoints", stage_dir / "set-aside", warn)
