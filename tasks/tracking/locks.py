"""Which parent runs still have a living process: an flock per flow run, and the status a dying run leaves."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mixtune.core.config import PipelineConfig
from mixtune.core.paths import locks_dir
from tasks.tracking.store import RUNNING

# A run's process holds an flock on its lock file for as long as it lives; the kernel lets go when the process
# dies, however it dies (SIGKILL and OOM included), so a free lock means the run's owner is gone.
_held_locks: dict[str, int] = {}


def hold_lock(run_id: str, path: Path) -> None:
    if run_id in _held_locks:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lock_status(path, RUNNING)  # the lock path is this flow run's own: nobody else holds it
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held_locks[run_id] = fd


def release_lock(run_id: str) -> None:
    fd = _held_locks.pop(run_id, None)
    if fd is not None:
        os.close(fd)


def owner_is_gone(lock: str) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def lock_path(config: PipelineConfig, flow_run_id: str) -> Path:
    return locks_dir(config.run.output_dir) / f"{flow_run_id}.lock"


def write_lock_status(path: Path, status: str) -> None:
    """A lock file always holds a status: written beside it and renamed over it, so a full disk leaves the old
    one whole instead of an empty file. The rename lets go of this process's flock on the old file too."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(status)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def leave_status(config: PipelineConfig, flow_run_id: str, status: str) -> bool:
    """For the next start on this host, when MLflow cannot be told now how this flow run ended. False when it
    could not be written either (a full disk): the lock file keeps RUNNING, and the next start reads KILLED."""
    path = lock_path(config, flow_run_id)
    if not path.is_file():
        return False
    try:
        write_lock_status(path, status)
    except OSError:
        return False
    return True


def pending_status(lock: Path) -> str:
    try:
        status = lock.read_text().strip()
    except OSError:
        return "KILLED"
    return status if status in ("FAILED", "KILLED") else "KILLED"
