"""Ingest: sources -> one table of normalised samples, a quarantine of rejected rows, and counts.

Every row read ends up accepted, duplicate, or quarantined with its file, line and reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from pydantic import BaseModel

from mixtune.cache import file_digest, fingerprint, is_complete, prefect_cache_key, mark_complete
from mixtune.config import PipelineConfig, Source
from mixtune.paths import cache_dir
from tasks.formats import RowError, to_conversation, to_text
from tasks.synthetic import GENERATOR_VERSION, write_synthetic

INGEST_VERSION = 1
READABLE_SUFFIXES = {".jsonl", ".json", ".txt"}


class IngestError(RuntimeError):
    """A source that cannot be read at all: the message names the file."""


class IngestResult(BaseModel):
    key: str
    folder: str
    samples: str
    quarantine: str
    stats: dict[str, dict]


def source_fingerprint(source: Source, seed: int) -> dict:
    spec = source.model_dump(exclude={"path"})
    if source.synthetic:
        return {**spec, "generator": GENERATOR_VERSION, "seed": seed}
    return {**spec, "sha256": file_digest(source.path)}


def ingest_key(config: PipelineConfig) -> str:
    seed = config.run.seed
    return fingerprint(INGEST_VERSION, seed, [source_fingerprint(s, seed) for s in config.data.sources])


def iter_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed row) pairs; a line that is not valid UTF-8 or JSON yields a RowError instead."""
    check_readable(path)
    if path.suffix == ".json":
        yield from enumerate(parse_json_file(path), start=1)
        return
    as_json = path.suffix == ".jsonl"
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, parse_line(raw, as_json)


def parse_line(raw: bytes, as_json: bool) -> object:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        return RowError("invalid_utf8", f"not UTF-8 at byte {err.start}")
    if not as_json:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return RowError("invalid_json", f"invalid JSON: {err.msg} at column {err.colno}")


def check_readable(path: Path) -> None:
    if path.is_dir():
        raise IngestError(f"{path}: is a directory, not a data file")
    if path.suffix not in READABLE_SUFFIXES:
        raise IngestError(f"{path}: unsupported extension {path.suffix!r} (use .jsonl, .json or .txt)")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise IngestError(f"{path}: cannot read: {err.strerror}") from None
    if size == 0:
        raise IngestError(f"{path}: file is empty")


def parse_json_file(path: Path) -> list:
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IngestError(f"{path}: not a valid JSON document: {err}") from None
    if not isinstance(rows, list):
        raise IngestError(f"{path}: a .json source must hold a list of records")
    return rows


def read_source(source: Source, path: Path) -> tuple[list[dict], list[dict]]:
    """Accepted samples and quarantined rows of one source, in file order."""
    accepted, rejected = [], []
    for line, row in iter_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            accepted.append({"line": line, **normalise(row, source)})
        except RowError as err:
            rejected.append({"file": str(path), "line": line, "reason": err.reason, "field": err.field,
                             "message": err.args[0], "row": preview(row)})
    if not accepted and rejected:
        first = rejected[0]
        raise IngestError(f"{path}: no row in a usable format; line {first['line']}: {first['message']}")
    return accepted, rejected


def normalise(row: object, source: Source) -> dict:
    if source.role == "pretrain":
        return {"messages": None, "text": to_text(row, source.format)}
    if isinstance(row, str):
        raise RowError("wrong_format", "plain text line in a conversation source")
    return {"messages": json.dumps(to_conversation(row, source.format), ensure_ascii=False), "text": None}


def preview(row: object, limit: int = 500) -> str:
    text = row.args[0] if isinstance(row, RowError) else json.dumps(row, ensure_ascii=False, default=str)
    return text[:limit]


def sample_id(record: dict) -> str:
    body = record["messages"] if record["messages"] is not None else record["text"]
    return hashlib.sha1(body.encode("utf-8")).hexdigest()[:16]


def assign_split(ids: pd.Series, source: Source, seed: int) -> pd.Series:
    """Seeded and per-row: a row's split depends on its content, not on where it sits in the file."""
    if source.role == "pretrain" or source.val_fraction == 0:
        return pd.Series("train", index=ids.index)
    n_val = min(source.max_val_samples, round(source.val_fraction * len(ids)))
    order = ids.map(lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest()).sort_values()
    split = pd.Series("train", index=ids.index)
    split[order.index[:n_val]] = "val"
    return split


def resolve_source_path(source: Source, config: PipelineConfig) -> Path:
    if source.synthetic:
        folder = Path(config.run.output_dir) / "synthetic"
        return write_synthetic(source.synthetic, source.samples, config.run.seed, folder)
    return Path(source.path)


def ingest(config: PipelineConfig, key: str | None = None) -> IngestResult:
    key = key or ingest_key(config)
    folder = cache_dir(config.run.output_dir, "ingest", key)
    result = IngestResult(key=key, folder=str(folder), samples=str(folder / "samples.parquet"),
                          quarantine=str(folder / "quarantine.jsonl"), stats={})
    if is_complete(folder):
        result.stats = json.loads((folder / "stats.json").read_text())
        return result
    folder.mkdir(parents=True, exist_ok=True)
    frames, quarantined, seen = [], [], set()
    for source in config.data.sources:
        frame, rejected, stats = ingest_source(source, config, seen)
        frames.append(frame)
        quarantined.extend(rejected)
        result.stats[source.label] = stats
    pd.concat(frames, ignore_index=True).to_parquet(result.samples, index=False)
    with open(result.quarantine, "w", encoding="utf-8") as out:
        for row in quarantined:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "stats.json").write_text(json.dumps(result.stats, indent=2))
    mark_complete(folder)
    return result


def ingest_source(source: Source, config: PipelineConfig, seen: set) -> tuple[pd.DataFrame, list, dict]:
    path = resolve_source_path(source, config)
    accepted, rejected = read_source(source, path)
    frame = pd.DataFrame(accepted, columns=["line", "messages", "text"])
    frame["sample_id"] = [sample_id(r) for r in accepted]
    first_here = ~frame["sample_id"].duplicated()
    unique = first_here & ~frame["sample_id"].isin(seen)
    seen.update(frame["sample_id"])
    frame = frame[unique].copy()
    frame["source"], frame["tag"] = source.label, source.role
    frame["split"] = assign_split(frame["sample_id"], source, config.run.seed)
    stats = {
        "file": str(path), "role": source.role, "rows_read": len(accepted) + len(rejected),
        "accepted": len(frame), "duplicates": int((~unique).sum()), "quarantined": len(rejected),
        "quarantined_by_reason": dict(Counter(r["reason"] for r in rejected)),
        "train": int((frame["split"] == "train").sum()), "val": int((frame["split"] == "val").sum()),
    }
    return frame, rejected, stats


def ingest_cache_key(config: PipelineConfig) -> str:
    key = ingest_key(config)
    return prefect_cache_key("ingest", key, cache_dir(config.run.output_dir, "ingest", key))


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10], persist_result=True, result_serializer="json",
      cache_key_fn=lambda _ctx, params: ingest_cache_key(params["config"]))
def ingest_task(config: PipelineConfig) -> IngestResult:
    result = ingest(config)
    log = get_run_logger()
    for label, s in result.stats.items():
        log.info("%s: %d read, %d accepted, %d duplicate, %d quarantined %s", label, s["rows_read"],
                 s["accepted"], s["duplicates"], s["quarantined"], s["quarantined_by_reason"] or "")
    return result
