"""Ingest: sources -> one table of normalised samples, a quarantine of rejected rows, and counts.

Every row read ends up accepted, duplicate, or quarantined with its file, line and reason; for every
source accepted + duplicates + quarantined = rows read. Files stream through in chunks, so memory
follows the chunk size, not the file size.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from array import array
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel

from mixtune.cache import file_digest, fingerprint, is_complete, mark_complete, prefect_cache_key
from mixtune.config import PipelineConfig, Source
from mixtune.logs import run_logger
from mixtune.paths import cache_dir
from tasks.readers import PARALLEL_FROM_BYTES, IngestError, check_readable, chunks, normalise_chunk, ordered_map
from tasks.synthetic import GENERATOR_VERSION, write_synthetic

__all__ = ["IngestError", "IngestResult", "ingest", "ingest_task"]

INGEST_VERSION = 2
SCRIPT_SAMPLE = 2000
SCHEMA = pa.schema([("line", pa.int64()), ("messages", pa.string()), ("text", pa.string()),
                    ("sample_id", pa.string()), ("turns", pa.int32()), ("source", pa.string()), ("tag", pa.string())])


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
    check_readable(Path(source.path))
    return {**spec, "sha256": file_digest(source.path)}


def ingest_key(config: PipelineConfig) -> str:
    seed, data = config.run.seed, config.data
    options = data.model_dump(exclude={"sources"})
    return fingerprint(INGEST_VERSION, seed, options, [source_fingerprint(s, seed) for s in data.sources])


def resolve_source_path(source: Source, config: PipelineConfig) -> Path:
    if source.synthetic:
        folder = Path(config.run.output_dir) / "synthetic"
        return write_synthetic(source.synthetic, source.samples, config.run.seed, folder)
    return Path(source.path)


def worker_spec(source: Source, config: PipelineConfig, path: Path) -> dict:
    """What a worker process needs to normalise rows: plain data only."""
    mapping = source.columns.model_dump() if source.columns else None
    return {"file": str(path), "role": source.role, "format": source.format, "mapping": mapping,
            "reasoning": config.data.reasoning, "system_prompt": source.system_prompt,
            "text_field": source.text_field, "dedupe": config.data.dedupe}


class SourceReader:
    """Streams one source into the shared writer, dropping duplicates against everything seen so far."""

    def __init__(self, source: Source, config: PipelineConfig, seen: set, near_seen: set):
        self.source, self.config, self.seen, self.near_seen = source, config, seen, near_seen
        self.path = resolve_source_path(source, config)
        self.reasons, self.turns = Counter(), Counter()
        self.rows_read = self.accepted = self.duplicates = self.near_duplicates = 0
        self.split_hashes = array("Q")
        self.script_sample: list[str] = []
        self.first_rejection: dict | None = None

    def run(self, writer: pq.ParquetWriter, quarantine) -> dict:
        spec = worker_spec(self.source, self.config, self.path)
        parallel = self.path.stat().st_size >= PARALLEL_FROM_BYTES
        work = partial(normalise_chunk, spec=spec)
        for accepted, rejected in ordered_map(work, chunks(self.path, self.source.text_split), parallel):
            self.rows_read += len(accepted) + len(rejected)
            self.quarantine(rejected, quarantine)
            kept = self.deduplicate(accepted)
            if kept:
                writer.write_batch(self.batch(kept))
        self.check_usable()
        return self.stats()

    def quarantine(self, rejected: list[dict], out) -> None:
        for row in rejected:
            self.reasons[row["reason"]] += 1
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.first_rejection = self.first_rejection or (rejected[0] if rejected else None)

    def deduplicate(self, accepted: list[tuple]) -> list[tuple]:
        kept = []
        for row in accepted:
            _, messages, text, sid, near, turns = row
            if sid in self.seen:
                self.duplicates += 1
            elif near is not None and near in self.near_seen:
                self.near_duplicates += 1
            else:
                self.seen.add(sid)
                if near is not None:
                    self.near_seen.add(near)
                kept.append(row)
                self.turns[turns] += 1
                self.split_hashes.append(split_hash(self.config.run.seed, sid))
                if len(self.script_sample) < SCRIPT_SAMPLE:
                    self.script_sample.append(messages or text)
        self.accepted += len(kept)
        return kept

    def batch(self, rows: list[tuple]) -> pa.RecordBatch:
        columns = list(zip(*rows))
        n = len(rows)
        return pa.RecordBatch.from_arrays(
            [pa.array(columns[0], pa.int64()), pa.array(columns[1], pa.string()), pa.array(columns[2], pa.string()),
             pa.array(columns[3], pa.string()), pa.array(columns[5], pa.int32()),
             pa.array([self.source.label] * n, pa.string()), pa.array([self.source.role] * n, pa.string())],
            schema=SCHEMA)

    def check_usable(self) -> None:
        quarantined = sum(self.reasons.values())
        if self.rows_read == 0:
            raise IngestError(f"{self.path}: holds no rows")
        if self.accepted + self.duplicates + self.near_duplicates == 0:
            first = self.first_rejection
            raise IngestError(f"{self.path}: no row in a usable format; line {first['line']}: {first['message']}")
        limit = self.config.data.max_quarantine_fraction
        if quarantined > limit * self.rows_read:
            top = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common(3))
            raise IngestError(f"{self.path}: {quarantined:,} of {self.rows_read:,} rows quarantined "
                              f"({quarantined / self.rows_read:.0%} > max_quarantine_fraction {limit:.0%}): {top}")

    def val_threshold(self) -> int:
        """Rows whose seeded hash is at most this go to validation: the n_val smallest, independent of file order."""
        source = self.source
        if source.role == "pretrain" or not self.split_hashes:
            return -1
        n_val = min(source.max_val_samples, round(source.val_fraction * len(self.split_hashes)))
        if n_val == 0:
            return -1
        hashes = np.frombuffer(self.split_hashes, dtype=np.uint64)
        return int(np.partition(hashes, n_val - 1)[n_val - 1])

    def stats(self) -> dict:
        return {
            "file": str(self.path), "role": self.source.role, "rows_read": self.rows_read,
            "accepted": self.accepted, "duplicates": self.duplicates + self.near_duplicates,
            "exact_duplicates": self.duplicates, "near_duplicates": self.near_duplicates,
            "quarantined": sum(self.reasons.values()), "quarantined_by_reason": dict(self.reasons),
            "turns": {str(k): v for k, v in sorted(self.turns.items())}, "scripts": script_mix(self.script_sample),
        }


def split_hash(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest(), "little")


def script_mix(texts: list[str]) -> dict[str, float]:
    """Share of letters per writing system in a sample of the source (e.g. LATIN 0.62, CJK 0.38)."""
    counts = Counter()
    for text in texts:
        for char in text:
            if char.isalpha():
                name = unicodedata.name(char, "OTHER").split(" ")[0]
                counts["CJK" if name in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else name] += 1
    total = sum(counts.values()) or 1
    return {name: round(n / total, 4) for name, n in counts.most_common(5)}


def ingest(config: PipelineConfig, key: str | None = None) -> IngestResult:
    key = key or ingest_key(config)
    folder = cache_dir(config.run.output_dir, "ingest", key)
    result = IngestResult(key=key, folder=str(folder), samples=str(folder / "samples.parquet"),
                          quarantine=str(folder / "quarantine.jsonl"), stats={})
    if is_complete(folder):
        result.stats = json.loads((folder / "stats.json").read_text())
        return result
    folder.mkdir(parents=True, exist_ok=True)
    unsplit, seen, near_seen, thresholds = folder / "unsplit.parquet", set(), set(), {}
    with pq.ParquetWriter(unsplit, SCHEMA) as writer, open(result.quarantine, "w", encoding="utf-8") as out:
        for source in config.data.sources:
            reader = SourceReader(source, config, seen, near_seen)
            result.stats[source.label] = reader.run(writer, out)
            thresholds[source.label] = reader.val_threshold()
    split_counts = write_with_splits(unsplit, Path(result.samples), thresholds, config.run.seed)
    unsplit.unlink()
    for label, counts in split_counts.items():
        result.stats[label].update(counts)
    (folder / "stats.json").write_text(json.dumps(result.stats, indent=2, ensure_ascii=False))
    mark_complete(folder)
    return result


def write_with_splits(unsplit: Path, target: Path, thresholds: dict[str, int], seed: int) -> dict[str, dict]:
    """Second pass over the written rows: add the split column, batch by batch."""
    counts = {label: {"train": 0, "val": 0} for label in thresholds}
    source_file = pq.ParquetFile(unsplit)
    schema = SCHEMA.append(pa.field("split", pa.string()))
    with pq.ParquetWriter(target, schema) as writer:
        for batch in source_file.iter_batches(batch_size=65536):
            labels, ids = batch.column("source").to_pylist(), batch.column("sample_id").to_pylist()
            split = ["val" if split_hash(seed, i) <= thresholds[s] else "train" for s, i in zip(labels, ids)]
            for s, part in zip(labels, split):
                counts[s][part] += 1
            writer.write_batch(pa.RecordBatch.from_arrays([*batch.columns, pa.array(split, pa.string())],
                                                          schema=schema))
    return counts


def ingest_cache_key(config: PipelineConfig) -> str:
    key = ingest_key(config)
    return prefect_cache_key("ingest", key, cache_dir(config.run.output_dir, "ingest", key))


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10], persist_result=True, result_serializer="json",
      cache_key_fn=lambda _ctx, params: ingest_cache_key(params["config"]))
def ingest_task(config: PipelineConfig) -> IngestResult:
    result = ingest(config)
    log = run_logger()
    for label, s in result.stats.items():
        log.info("%s: %d read, %d accepted, %d duplicate, %d quarantined %s", label, s["rows_read"],
                 s["accepted"], s["duplicates"], s["quarantined"], s["quarantined_by_reason"] or "")
    return result
