"""Ingest: sources -> one table of normalised samples, a quarantine of rejected rows, and counts.

Every row read ends up accepted, duplicate, or quarantined with its file, line and reason; for every
source accepted + duplicates + quarantined = rows read. Files stream through in chunks, so memory
follows the chunk size, not the file size.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from mixtune.core.cache import Entry, building, entry_dir, mark_complete, prefect_cache_key
from mixtune.core.config import PipelineConfig, Source
from mixtune.core.datafiles import Part
from mixtune.core.logs import run_logger
from mixtune.core.retry import retry_unless
from tasks.files import (
    IngestError,
    checked_files,
    expansion,
    has_utf8_bom,
    location_unit,
    source_digest,
    source_layout,
)
from tasks.keys import ingest_key
from tasks.readers import CHUNK_SCHEMA, PARALLEL_FROM_BYTES, normalise_item, ordered_map, source_chunks, where
from tasks.records import Exploded, IngestResult, SourceStats
from tasks.sources import (
    check_training_sets,
    check_validation_sets,
    read_stats,
    script_mix,
    validation_count,
    write_stats,
)
from tasks.synthetic import write_synthetic

__all__ = ["IngestError", "IngestResult", "ingest", "ingest_task"]

SCRIPT_SAMPLE = 2000
SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("messages", pa.string()),
        ("text", pa.string()),
        ("sample_id", pa.string()),
        ("turns", pa.int32()),
        ("source", pa.string()),
        ("tag", pa.string()),
        ("split", pa.string()),
    ]
)


def resolve_source_path(source: Source, config: PipelineConfig) -> Path:
    if source.synthetic:
        folder = Path(config.run.output_dir) / "synthetic"
        return write_synthetic(source.synthetic, source.samples, config.run.seed, folder)
    return Path(source.path)


def worker_spec(source: Source, config: PipelineConfig, part: Part) -> dict:
    """What a worker process needs to normalise one part's rows: plain data only."""
    # A mapped row's turns are numbered as trained: the source's system turn is part of its mapping.
    mapping = {**source.columns.model_dump(), "system_prompt": source.system_prompt} if source.columns else None
    return {
        "file": str(part.path),
        "plain": part.suffix == ".txt",
        "role": source.role,
        "format": source.format,
        "mapping": mapping,
        "reasoning": config.data.reasoning,
        "system_prompt": source.system_prompt,
        "text_field": source.text_field,
        "dedupe": config.data.dedupe,
        "seed": config.run.seed,
        "max_row_bytes": config.data.max_row_bytes,
        "unit": location_unit(part),
    }


class ValidationDraw:
    """The validation split in one pass: a row is held out when its seeded hash is among the smallest of its
    source. Only the `capacity` smallest seen so far are kept in memory (max_val_samples bounds it); every
    other row is train for certain, and is written out at once."""

    def __init__(self, capacity: int):
        self.capacity, self.heap, self.counter = capacity, [], 0  # heap of (-hash, n, one-row batch)

    def offer(self, batch: pa.RecordBatch) -> pa.Table:
        """Takes a batch; returns the rows that are certainly train."""
        if self.capacity == 0:
            return pa.Table.from_batches([batch])
        hashes = batch.column("split_hash").to_numpy()
        limit = -self.heap[0][0] if len(self.heap) == self.capacity else np.iinfo(np.uint64).max
        candidate = hashes <= limit
        if not candidate.any():
            return pa.Table.from_batches([batch])
        out = [batch.filter(pa.array(~candidate))]
        for i in np.flatnonzero(candidate):
            item = (-int(hashes[i]), self.counter, batch.slice(int(i), 1))
            self.counter += 1
            if len(self.heap) < self.capacity:
                heapq.heappush(self.heap, item)
            elif item[0] > self.heap[0][0]:
                out.append(heapq.heapreplace(self.heap, item)[2])
            else:
                out.append(item[2])
        return pa.Table.from_batches(out, schema=batch.schema)

    def final(self, n_val: int) -> tuple[pa.Table, pa.Table]:
        """(validation rows, remaining train rows): the n_val smallest hashes are validation."""
        rows = [batch for _, _, batch in sorted(self.heap, key=lambda item: (-item[0], item[1]))]
        empty = pa.Table.from_batches([], schema=CHUNK_SCHEMA)
        pick = lambda part: pa.Table.from_batches(part, schema=CHUNK_SCHEMA) if part else empty  # noqa: E731
        return pick(rows[:n_val]), pick(rows[n_val:])


class SourceReader:
    """Streams one source into the shared writer, dropping duplicates against everything seen so far."""

    def __init__(self, source: Source, config: PipelineConfig, seen: set, near_seen: set):
        self.source, self.config, self.seen, self.near_seen = source, config, seen, near_seen
        self.path = resolve_source_path(source, config)
        self.files = checked_files(self.path, source.split)
        self.reasons, self.turns, self.formats = Counter(), Counter(), Counter()
        self.source_rows = 0  # rows of the file; more samples than rows when a list field is exploded
        self.rows_read = self.accepted = self.duplicates = self.near_duplicates = 0
        self.held_out = ValidationDraw(0 if source.role == "pretrain" else source.max_val_samples)
        self.script_sample: list[str] = []
        self.first_rejection: dict | None = None

    def run(self, writer: pq.ParquetWriter, quarantine) -> SourceStats:
        before = self.part_states()
        digest = source_digest(self.files)  # what the cache key hashed, unless a file changed since
        data_bytes = sum(size * expansion(part) for part, (size, _) in zip(self.files.parts, before))
        parallel = data_bytes >= PARALLEL_FROM_BYTES
        spec_of = partial(worker_spec, self.source, self.config)
        rows = source_chunks(self.files, spec_of, self.source.text_split, self.config.data.max_row_bytes)
        for accepted, rejected in ordered_map(normalise_item, rows, parallel):
            self.rows_read += accepted.num_rows + len(rejected)
            self.formats.update(accepted.column("format").to_pylist())
            numbers = {*accepted.column("line").to_pylist(), *(r.get("line", r.get("record")) for r in rejected)}
            self.source_rows += len(numbers)
            self.quarantine(rejected, quarantine)
            kept = self.deduplicate(accepted)
            if kept.num_rows:
                self.write(writer, self.held_out.offer(kept), "train")
        self.check_unchanged(before, digest)
        self.check_usable()
        fraction = 1.0 if self.source.role == "general_eval" else self.source.val_fraction  # none of it trains
        n_val = validation_count(self.accepted, fraction, self.source.max_val_samples)
        val, train = self.held_out.final(n_val)
        self.write(writer, train, "train")
        self.write(writer, val, "val")
        return self.stats(train=self.accepted - val.num_rows, val=val.num_rows)

    def quarantine(self, rejected: list[dict], out) -> None:
        for row in rejected:
            self.reasons[row["reason"]] += 1
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.first_rejection = self.first_rejection or (rejected[0] if rejected else None)

    def deduplicate(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """First occurrence wins, in file order and across sources."""
        ids, near = batch.column("sample_id").to_pylist(), batch.column("near_id").to_pylist()
        keep = []
        for sid, nid in zip(ids, near):
            if sid in self.seen:
                self.duplicates += 1
                keep.append(False)
            elif nid is not None and nid in self.near_seen:
                self.near_duplicates += 1
                keep.append(False)
            else:
                self.seen.add(sid)
                if nid is not None:
                    self.near_seen.add(nid)
                keep.append(True)
        kept = batch if all(keep) else batch.filter(pa.array(keep, pa.bool_()))
        self.accepted += kept.num_rows
        self.turns.update(kept.column("turns").to_pylist())
        if len(self.script_sample) < SCRIPT_SAMPLE:
            bodies = kept.column("messages" if self.source.role != "pretrain" else "text")
            self.script_sample += [b[:500] for b in bodies.slice(0, SCRIPT_SAMPLE).to_pylist()]
        return kept

    def write(self, writer: pq.ParquetWriter, batch: pa.RecordBatch | pa.Table, split: str) -> None:
        n = batch.num_rows
        if n == 0:
            return
        columns = [batch.column(name) for name in ("line", "messages", "text", "sample_id", "turns")]
        constants = [pa.array([value] * n, pa.string()) for value in (self.source.label, self.source.role, split)]
        writer.write_table(pa.Table.from_arrays([*columns, *constants], schema=SCHEMA))

    def part_states(self) -> list[tuple[int, int]]:
        return [(stat.st_size, stat.st_mtime_ns) for stat in (part.path.stat() for part in self.files.parts)]

    def check_unchanged(self, before: list[tuple[int, int]], digest: str) -> None:
        """The entry is keyed by the files' hash: rows read from a file that changed meanwhile are not its rows."""
        if self.part_states() != before or source_digest(self.files) != digest:
            raise IngestError(f"{self.path}: changed while it was being read; ingest it again once it is complete")

    def check_usable(self) -> None:
        quarantined = sum(self.reasons.values())
        if self.rows_read == 0:
            raise IngestError(f"{self.path}: holds no rows")
        if self.accepted + self.duplicates + self.near_duplicates == 0:
            first = self.first_rejection
            shard = f"{first['file']} " if first["file"] != str(self.path) else ""
            raise IngestError(f"{self.path}: no row in a usable format; {shard}{where(first)}: {first['message']}")
        limit = self.config.data.max_quarantine_fraction
        if quarantined > limit * self.rows_read:
            top = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common(3))
            raise IngestError(
                f"{self.path}: {quarantined:,} of {self.rows_read:,} rows quarantined "
                f"({quarantined / self.rows_read:.0%} > max_quarantine_fraction {limit:.0%}): {top}"
            )

    def exploded(self) -> Exploded | None:
        field = self.source.columns.explode if self.source.columns else None
        return Exploded(field=field, rows=self.source_rows, samples=self.rows_read) if field else None

    def stats(self, train: int, val: int) -> SourceStats:
        return SourceStats(
            file=str(self.path),
            role=self.source.role,
            layout=source_layout(self.files),
            shards=[part.path.name for part in self.files.parts] if self.files.kind != "file" else None,
            sha256=source_digest(self.files),
            utf8_bom=any(has_utf8_bom(part) for part in self.files.parts),
            formats=dict(self.formats.most_common()),
            exploded=self.exploded(),
            rows_read=self.rows_read,
            accepted=self.accepted,
            duplicates=self.duplicates + self.near_duplicates,
            exact_duplicates=self.duplicates,
            near_duplicates=self.near_duplicates,
            quarantined=sum(self.reasons.values()),
            quarantined_by_reason=dict(self.reasons),
            turns={str(k): v for k, v in sorted(self.turns.items())},
            scripts=script_mix(self.script_sample),
            train=train,
            val=val,
        )


def ingest(config: PipelineConfig, key: str | None = None) -> IngestResult:
    key = key or ingest_key(config)
    folder = entry_dir(config.run.output_dir, Entry.INGEST, key)
    result = IngestResult(
        key=key,
        folder=str(folder),
        samples=str(folder / "samples.parquet"),
        quarantine=str(folder / "quarantine.jsonl"),
        stats={},
    )
    with building(folder) as build:
        if build:
            read_sources(config, key, result)
    result.stats = read_stats(folder / "stats.json")
    return result


def read_sources(config: PipelineConfig, key: str, result: IngestResult) -> None:
    folder = Path(result.folder)
    seen, near_seen = set(), set()
    # Dictionary encoding only where values repeat: trying it on long unique texts costs time for nothing.
    with (
        pq.ParquetWriter(result.samples, SCHEMA, use_dictionary=["source", "tag", "split"]) as writer,
        open(result.quarantine, "w", encoding="utf-8") as out,
    ):
        for source in config.data.sources:
            result.stats[source.label] = read_source(source, config, seen, near_seen, writer, out)
    if ingest_key(config) != key:  # a source changed between the key and the read
        raise IngestError(f"{', '.join(s.label for s in config.data.sources)}: changed since ingest began")
    write_stats(folder / "stats.json", result.stats)
    mark_complete(folder)


def read_source(source: Source, config: PipelineConfig, seen: set, near_seen: set, writer, out) -> SourceStats:
    """One source's rows into the writer; whatever fails in reading it is reported as that file's error."""
    try:
        return SourceReader(source, config, seen, near_seen).run(writer, out)
    except IngestError:
        raise
    except (OSError, RecursionError, ValueError, pa.ArrowException) as err:
        raise IngestError(f"{source.label}: cannot be read: {type(err).__name__}: {err}") from None


def refuse_unusable_inputs(config: PipelineConfig, stats: dict[str, SourceStats]) -> None:
    """Every refusal `run` makes from ingest's counts before anything trains; `mixtune check` calls it too, so
    it fails on exactly the inputs `run` would refuse, with the same message."""
    # rehearsal: self adds its general source after the base model is built, and checks the general set then
    roles = ("domain",) if config.data.rehearsal == "self" else ("domain", "general")
    held_out = ("general_eval",) if any(s.role == "general_eval" for s in config.data.sources) else ()
    check_validation_sets(stats, config.data.min_val_samples, roles + held_out)
    check_training_sets(stats, roles)


def ingest_cache_key(config: PipelineConfig) -> str:
    return prefect_cache_key(Entry.INGEST, ingest_key(config), config.run.output_dir)


@task(
    name="ingest",
    task_run_name="ingest",
    retries=2,
    retry_delay_seconds=[2, 10],
    persist_result=True,
    result_serializer="json",
    cache_key_fn=lambda _ctx, params: ingest_cache_key(params["config"]),
    retry_condition_fn=retry_unless(IngestError),
)
def ingest_task(config: PipelineConfig) -> IngestResult:
    result = ingest(config)
    refuse_unusable_inputs(config, result.stats)
    log = run_logger()
    for label, s in result.stats.items():
        log.info(
            "%s (%s%s; formats %s): %d read, %d accepted, %d duplicate, %d quarantined %s",
            label,
            s.layout,
            ", UTF-8 BOM stripped" if s.utf8_bom else "",
            s.formats,
            s.rows_read,
            s.accepted,
            s.duplicates,
            s.quarantined,
            s.quarantined_by_reason or "",
        )
    return result
