"""Content-addressed caching shared by every cached stage (ingest, base model, tokenisation, baseline,
rehearsal)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from mixtune.core.logs import run_logger
from mixtune.core.paths import cache_dir

COMPLETE_MARKER = "_complete"
CACHE_ID = "_cache_id"
LAST_USED = "_last_used"  # its mtime: when a run last used the entry (`mixtune gc` prunes by it)
NOT_CONTENT = {COMPLETE_MARKER, CACHE_ID, f"{COMPLETE_MARKER}.tmp", LAST_USED}


class Entry(StrEnum):
    """Every kind of cache entry, named once: its folder prefix and its Prefect cache key both come from here."""

    INGEST = "ingest"
    TOKENIZER = "tokenizer"
    TOKENS = "tokens"
    BASE = "base"
    BASELINE = "baseline"  # the base model's validation losses and probe answers
    REHEARSAL = "rehearsal"  # the base model's answers to the rehearsal prompts (data.rehearsal: self)
    REHEARSED = "rehearsed"  # the ingested samples with those answers added as a general source
    DISTILL = "distill"  # the base model's rewrites of the domain answers (data.self_distill)
    DISTILLED = "distilled"  # the samples with the accepted rewrites in place of their answers
    GENERATION = "generation"  # the base model's answers to the generation check's general prompts
    CHAMPION = "champion"


def entry_dir(output_dir: str, entry: Entry, key: str) -> Path:
    return cache_dir(output_dir, entry.value, key)


def fingerprint(*parts: object) -> str:
    """A stable hash of JSON-able parts: the cache key of a stage's inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, computed once per process while the file is unchanged: one run asks for a
    data file's digest several times (the input check, ingest's cache key, the data report)."""
    stat = os.stat(path)
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1024)
def _digest(path: str, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in NOT_CONTENT)


def mark_complete(folder: Path) -> None:
    """Written last, atomically: the marker lists the sha256 of every file it vouches for."""
    digests = {str(p.relative_to(folder)): file_digest(p) for p in content_files(folder)}
    staged = folder / f"{COMPLETE_MARKER}.tmp"
    staged.write_text(json.dumps({"files": digests}, indent=1))
    os.replace(staged, folder / COMPLETE_MARKER)


def is_complete(folder: Path) -> bool:
    """The entry is there and every file is as it was when it was marked: a missing, truncated or altered file
    (or a marker from before markers carried digests) means the entry is rebuilt, never used."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file() or file_digest(path) != digest:
            run_logger().warning("cache entry %s: %s is missing or damaged; rebuilding the entry", folder, name)
            marker.unlink(missing_ok=True)
            return False
    return True


def touch_last_used(folder: Path) -> None:
    (folder / LAST_USED).touch()


def last_used(folder: Path) -> float:
    """When a run last used the entry (or built it, when none has since): the time gc judges it by."""
    marks = [folder / LAST_USED, folder / COMPLETE_MARKER, folder]
    return max(p.stat().st_mtime for p in marks if p.exists())


@contextmanager
def entry_lock(folder: Path) -> Iterator[None]:
    """One builder per cache entry across processes and threads: a second waits here, then finds the entry
    complete and reuses it. flock is released by the kernel when its holder dies, however it dies."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f"{folder.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            run_logger().info("cache entry %s: another run is building it; waiting", folder.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_entry(folder: Path) -> bool:
    """Delete an entry unless a run holds its lock now (building it, or about to use it): False then."""
    fd = os.open(folder.parent / f"{folder.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    return True


@contextmanager
def building(folder: Path) -> Iterator[bool]:
    """`with building(folder) as build:` holds the entry's lock; `build` is False when it is complete already."""
    with entry_lock(folder):
        build = not is_complete(folder)
        if build:
            run_logger().info("cache entry %s: building", folder.name)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            touch_last_used(folder)
        yield build


def prefect_cache_key(entry: Entry, key: str, output_dir: str) -> str:
    """Prefect's cache key for a content-addressed output folder.

    The key carries an id stored inside the folder, renewed whenever the entry is not complete with every
    file matching its marker's digests. So a Prefect cache record can only ever point at one verified build:
    delete the folder, its marker or one of its files, or damage one, and the next run gets a new id, misses
    the cache and rebuilds, instead of reporting "Cached" for files that are gone or wrong."""
    folder = entry_dir(output_dir, entry, key)
    id_file = folder / CACHE_ID
    if not is_complete(folder) or not id_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        staged = folder / f"{CACHE_ID}.{uuid.uuid4().hex}"
        staged.write_text(uuid.uuid4().hex[:12])
        os.replace(staged, id_file)
    else:  # a Prefect cache hit runs no task body: this is the only sign the entry was used
        touch_last_used(folder)
    return f"{entry.value}-{key}-{id_file.read_text().strip()}"
