"""Content-addressed caching shared by every cached stage (ingest, base model, tokenisation)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

COMPLETE_MARKER = "_complete"


def fingerprint(*parts: object) -> str:
    """A stable hash of JSON-able parts: the cache key of a stage's inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def mark_complete(folder: Path) -> None:
    (folder / COMPLETE_MARKER).write_text("ok\n")


def key_if_complete(key: str, folder: Path) -> str:
    """Prefect's cache key: the content key while its outputs are on disk, a fresh key once they are gone,
    so a deleted output folder is rebuilt instead of being "cached" as a dangling path."""
    return key if is_complete(folder) else f"{key}-rebuild-{uuid.uuid4().hex[:8]}"
