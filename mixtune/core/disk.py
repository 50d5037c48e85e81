"""A full disk, said once: which folder, how much the write needed and how much is free there, instead of the
chained tracebacks of whichever library was writing (OSError errno 28, safetensors' SafetensorError, torch's
"file write failed", SQLite's "database or disk is full")."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
FULL_WORDS = ("No space left on device", "Disk quota exceeded", "database or disk is full")
# torch.save names no cause: "file write failed", or, when a write came up short, "unexpected pos 267392 vs 267280"
TORCH_SHORT_WRITES = ("write failed", "unexpected pos")


class DiskFull(RuntimeError):
    """A write failed for want of space; the message names the folder and the space needed."""


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """The error, then the one it was raised from or while handling, and so on."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def says_disk_full(err: BaseException | None) -> bool:
    """The error, or one it was raised from or while handling, is a full disk."""
    return any(
        isinstance(e, OSError) and e.errno in FULL_ERRNOS or any(w in str(e) for w in FULL_WORDS)
        for e in error_chain(err)
    )


def free_bytes(folder: Path) -> int:
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    return shutil.disk_usage(existing).free


def readable_size(n: int) -> str:
    """In MB, or in KB below a tenth of one (a stage's mix is a few KB: "0.0 MB" would say nothing)."""
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 // 10 else f"{n / 2**10:,.1f} KB"


@contextmanager
def disk_full_as(
    message: Callable[[BaseException], str], full: Callable[[BaseException], bool] = says_disk_full
) -> Iterator[None]:
    """A failure inside the block that `full` reads as a full disk raises DiskFull(message(err)) instead, without
    the chained tracebacks; any other error, and a DiskFull already said, passes through."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        if not full(err):
            raise
        raise DiskFull(message(err)) from None


def space_for(folder: Path, what: str, needed: int, free_some: Callable[[], int] = lambda: 0):
    """Writes inside the block that fail for want of space raise DiskFull, naming `folder` and `needed` bytes.

    A writer that names no cause (torch.save) counts as a full disk when less than `needed` is free.
    `free_some` frees what the writer may (returns the bytes freed) before the message is made, so that a
    rerun finds the room this one did not."""

    def full(err: BaseException) -> bool:
        short_write = any(words in str(err) for words in TORCH_SHORT_WRITES)
        return says_disk_full(err) or (short_write and free_bytes(folder) < needed)

    def message(err: BaseException) -> str:
        freed = free_some()
        return (
            f"disk full while writing {what} in {folder}: it needs about {readable_size(needed)}, "
            f"{readable_size(free_bytes(folder))} free there"
            + (f" (after removing {readable_size(freed)} of set-aside checkpoints)" if freed else "")
            # The run ends FAILED, and only an interrupted run's stages resume: the rerun starts over on its caches.
            + "; free some space there (or set run.output_dir on a larger disk) and run again: it reuses the "
            "cached data, tokenizer, base model and baseline"
        )

    return disk_full_as(message, full)
