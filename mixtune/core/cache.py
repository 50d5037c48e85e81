"""Content-addressed caching shared by every cached stage (ingest, base model, tokenisation)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from mixtune.core.paths import cache_dir

COMPLETE_MARKER = "_complete"


class Entry(StrEnum):
    """Every kind of cache entry, named once: its folder prefix and its Prefect cache key both come from here."""

    INGEST = "ingest"
    TOKENIZER = "tokenizer"
    TOKENS = "tokens"
    BASE = "base"
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


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def mark_complete(folder: Path) -> None:
    (folder / COMPLETE_MARKER).write_text("ok\n")


def prefect_cache_key(entry: Entry, key: str, output_dir: str) -> str:
    """Prefect's cache key for a content-addressed output folder.

    The key carries an id stored inside the folder, so a Prefect cache record can only ever point at the
    folder it was made with: delete the folder and the next run gets a new id, misses the cache and rebuilds,
    instead of "hitting" a record whose files are gone."""
    folder = entry_dir(output_dir, entry, key)
    id_file = folder / "_cache_id"
    if not id_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        id_file.write_text(uuid.uuid4().hex[:12])
    return f"{entry.value}-{key}-{id_file.read_text().strip()}"
