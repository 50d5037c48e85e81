"""Sources read in bounded chunks, and rows turned into samples, in parallel where a file is large.

A chunk is a list of (location, row): location is the 1-based line (JSONL, text) or record number (JSON,
CSV, Parquet), and a rejected row names it as such; row is raw bytes (JSONL: parsed in the worker), a parsed
record, a text document, or a RowError. Memory stays bounded by the chunks in flight, not by the file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from mixtune.core.datafiles import ARROW, Part, SourceFiles
from tasks.files import (
    BLOCK_BYTES,
    DECOMPRESSION_ERRORS,
    UTF8_BOM,
    IngestError,
    check_readable,
    has_utf8_bom,
    layout,
    open_binary,
)
from tasks.formats import RowError, check_turn_characters, detect_format, to_conversation, to_text

CHUNK_ROWS = 4096
PARALLEL_FROM_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves
SURROGATE = re.compile("[\udc80-\udcff]")
CHUNK_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("messages", pa.string()),
        ("text", pa.string()),
        ("sample_id", pa.string()),
        ("near_id", pa.string()),
        ("turns", pa.int32()),
        ("split_hash", pa.uint64()),
        ("format", pa.string()),
    ]
)
NOT_WORD = re.compile(r"[\W_]+")


def where(rejection: dict) -> str:
    """A rejected row's place in its file, as a person would look for it: "line 8" or "record 3"."""
    unit = "line" if "line" in rejection else "record"
    return f"{unit} {rejection[unit]}"


def source_chunks(files: SourceFiles, spec_of: Callable[[Part], dict], text_split: str, max_row_bytes: int) -> Iterator:
    """(part's spec, chunk) for every chunk of every part in order: one worker pool serves every shard."""
    for part in files.parts:
        spec = spec_of(part)
        for chunk in chunks(part, text_split, max_row_bytes):
            yield spec, chunk


def normalise_item(item: tuple[dict, object]) -> tuple[pa.RecordBatch, list[dict]]:
    spec, chunk = item
    return normalise_chunk(chunk, spec)


def chunks(
    part: Part, text_split: str = "line", max_row_bytes: int = 1_000_000
) -> Iterator[list[tuple[int, object]] | tuple[int, bytes]]:
    check_readable(part)
    has_utf8_bom(part)
    try:
        yield from part_chunks(part, text_split, max_row_bytes)
    except DECOMPRESSION_ERRORS as err:
        raise IngestError(f"{part.path}: damaged {part.compression} data: {err}") from None
    except OSError as err:
        if part.compression is None:
            raise
        raise IngestError(f"{part.path}: damaged {part.compression} data: {err}") from None


def part_chunks(part: Part, text_split: str, max_row_bytes: int) -> Iterator:
    if layout(part).startswith("jsonl"):
        yield from jsonl_blocks(part, max_row_bytes)
        return
    readers = {
        ".json": json_records,
        ".csv": (lambda p: csv_records(p, max_row_bytes)),
        ".parquet": parquet_records,
        ARROW: arrow_records,
        ".txt": (lambda p: text_documents(p, text_split, max_row_bytes)),
    }
    batch = []
    for item in readers[part.suffix](part):
        batch.append(item)
        if len(batch) == CHUNK_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def too_large(size: int, limit: int) -> RowError:
    return RowError("too_large", f"row is {size:,} bytes, over data.max_row_bytes {limit:,}")


def jsonl_blocks(part: Part, max_row_bytes: int) -> Iterator[tuple[int, bytes] | list[tuple[int, RowError]]]:
    """(number of the block's first line, whole lines as one bytes block): the reader does no per-line work,
    the workers split blocks into lines. A line that outgrows max_row_bytes is not kept: the rest of it is
    read past and it comes out as one too_large row, so memory stays bounded whatever a line's length."""
    first, rest, skipped = 1, b"", None  # skipped: bytes of an over-long line read so far
    with open_binary(part) as handle:
        rest = handle.read(len(UTF8_BOM)).removeprefix(UTF8_BOM)  # no seek: a decompressing stream goes forward
        while block := handle.read(BLOCK_BYTES):
            if skipped is not None:
                end = block.find(b"\n")
                if end < 0:
                    skipped += len(block)
                    continue
                yield [(first, too_large(skipped + end, max_row_bytes))]
                first, skipped, block = first + 1, None, block[end + 1 :]
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut:
                yield first, block[:cut]
                first += block.count(b"\n", 0, cut)
            rest = block[cut:]
            if len(rest) > max_row_bytes:
                skipped, rest = len(rest), b""
    if skipped is not None:
        yield [(first, too_large(skipped, max_row_bytes))]
    elif rest:
        yield first, rest


def block_lines(first: int, block: bytes, max_row_bytes: int) -> list[tuple[int, bytes | RowError]]:
    return [
        (first + i, raw if len(raw) <= max_row_bytes else too_large(len(raw), max_row_bytes))
        for i, raw in enumerate(block.split(b"\n"))
        if raw.strip()
    ]


def json_records(part: Part) -> Iterator[tuple[int, object]]:
    """A .json source is one document (a list of records): parsed whole, compressed or not, so keep large data
    in JSONL."""
    path = part.path
    try:
        with open_binary(part) as handle:
            rows = json.loads(handle.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IngestError(f"{path}: not a valid JSON document: {err}") from None
    except RecursionError:
        raise IngestError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(rows, list):
        raise IngestError(f"{path}: a .json source must hold a list of records")
    yield from enumerate(rows, start=1)


def csv_records(part: Part, max_row_bytes: int) -> Iterator[tuple[int, object]]:
    """Records, not lines: a quoted cell may span lines. Bytes that are not UTF-8 spoil only their row."""
    csv.field_size_limit(max_row_bytes)  # the csv module's own cap (128 KiB) would refuse fields we accept
    number, path = 0, part.path
    with io.TextIOWrapper(open_binary(part), encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        try:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise IngestError(f"{path}: CSV has no header row")
            for number, row in enumerate(reader, start=1):
                yield number, csv_row(row, len(reader.fieldnames))
        except csv.Error as err:  # a cell over the limit: the csv module cannot resume after it
            raise IngestError(f"{path}: record {number + 1}: {err} (data.max_row_bytes)") from None


def csv_row(row: dict, width: int) -> dict | RowError:
    if None in row:
        cells = [v for k, v in row.items() if k is not None] + row[None]
        return RowError("bad_csv_row", f"{len(row[None])} more cell(s) than the header's {width}", raw=cells)
    if any(value is not None and SURROGATE.search(value) for value in row.values()):
        readable = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for k, v in row.items() if v}
        return RowError("invalid_utf8", "cell is not valid UTF-8", raw=readable)
    return row


def parquet_records(part: Part) -> Iterator[tuple[int, object]]:
    try:
        table = pq.ParquetFile(part.path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise IngestError(f"{part.path}: not a readable Parquet file: {err}") from None
    yield from numbered(table.iter_batches(batch_size=CHUNK_ROWS))


def arrow_records(part: Part) -> Iterator[tuple[int, object]]:
    """An Arrow IPC file, as datasets' save_to_disk writes it (the stream format; the file format too), read a
    record batch at a time from a memory map."""
    with pa.memory_map(str(part.path)) as source:
        try:
            is_file = source.read(6) == b"ARROW1"
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
        except pa.ArrowException as err:
            raise IngestError(f"{part.path}: not a readable Arrow file: {err}") from None
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else reader
        yield from numbered(batches)


def numbered(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[int, dict]]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield number, row


def bounded_lines(handle, limit: int) -> Iterator[bytes | RowError]:
    """A binary file's lines, each read at most `limit` bytes at a time: a longer line is read past, not kept."""
    while raw := handle.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        size = len(raw)
        while (piece := handle.readline(BLOCK_BYTES)) and not piece.endswith(b"\n"):
            size += len(piece)
        yield too_large(size + len(piece.rstrip(b"\n")), limit)


def text_documents(part: Part, split: str, max_row_bytes: int) -> Iterator[tuple[int, object]]:
    """One document per line, or (blank_line) paragraphs separated by blank lines."""
    start, lines = None, []
    with open_binary(part) as handle:
        for number, raw in enumerate(bounded_lines(handle, max_row_bytes), start=1):
            if isinstance(raw, RowError):
                yield number, raw
                continue
            if number == 1:
                raw = raw.removeprefix(UTF8_BOM)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield number, RowError("invalid_utf8", f"not UTF-8 at byte {err.start}")
                continue
            if split == "line":
                if line.strip():
                    yield number, line
            elif line.strip():
                start, lines = start or number, [*lines, line]
            elif lines:
                yield start, "\n".join(lines)
                start, lines = None, []
    if lines:
        yield start, "\n".join(lines)


def parse_jsonl(raw: bytes) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return RowError("invalid_utf8", f"not UTF-8 at byte {err.start}")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as err:
        return RowError("invalid_json", f"invalid JSON: {err}")


def sample_key(body: str, dedupe: str) -> str:
    if dedupe == "normalized":
        body = NOT_WORD.sub(" ", body.lower()).strip()
    return hashlib.blake2b(body.encode("utf-8"), digest_size=8).hexdigest()


def normalise_chunk(
    chunk: list[tuple[int, object]] | tuple[int, bytes], spec: dict
) -> tuple[pa.RecordBatch, list[dict]]:
    """Accepted rows as one Arrow batch (cheap to hand from a worker process to the parent), and rejected
    rows with their reason."""
    limit = spec["max_row_bytes"]
    if isinstance(chunk, tuple):
        chunk = block_lines(*chunk, limit)
    columns = {name: [] for name in CHUNK_SCHEMA.names}
    rejected = []
    for location, raw in chunk:
        row = parse_jsonl(raw) if isinstance(raw, bytes) else raw
        if not isinstance(row, RowError) and not isinstance(raw, bytes) and (size := text_bytes(row)) > limit:
            row = too_large(size, limit)  # .json, .csv and Parquet rows: parsed already, but not tokenised
        for sample in exploded(row, spec):
            accept_row(location, sample, spec, columns, rejected, raw)
    return pa.RecordBatch.from_pydict(columns, schema=CHUNK_SCHEMA), rejected


def exploded(row: object, spec: dict) -> list[object]:
    """`columns.explode: instances`: one sample per item of the row's list of records, each item's keys over
    the row's other fields; a row whose field is not such a list is one RowError."""
    field = (spec["mapping"] or {}).get("explode")
    if not field or not isinstance(row, dict):
        return [row]
    items = row.get(field)
    if not isinstance(items, list) or not items:
        return [RowError("wrong_type", f"field '{field}' to explode is not a non-empty list of records", field)]
    rest = {k: v for k, v in row.items() if k != field}
    return [
        {**rest, **item}
        if isinstance(item, dict)
        else RowError("wrong_type", f"{field}[{i}] is a {type(item).__name__}, not a record", f"{field}[{i}]")
        for i, item in enumerate(items)
    ]


def accept_row(location: int, row: object, spec: dict, columns: dict, rejected: list[dict], raw: object) -> None:
    """`raw` is what the file held: a rejected row is quarantined as itself, never as its error message."""
    try:
        if isinstance(row, RowError):
            raise row
        values = (location, *normalise(row, spec))
    except RowError as err:
        rejected.append(
            {
                "file": spec["file"],
                spec["unit"]: location,
                "reason": err.reason,
                "field": err.field,
                "message": err.args[0],
                "row": preview(as_read(raw, row)),
            }
        )
        return
    for name, value in zip(CHUNK_SCHEMA.names, values):
        columns[name].append(value)
    columns["split_hash"].append(split_hash(spec["seed"], values[3]))
    columns["format"].append(row_format(row, spec))


def as_read(raw: object, row: object) -> object:
    """The row as the file held it: the line or record read, or what a reader kept of a row it refused (a
    CSV row's cells; nothing of a row too large to keep). The reason and message have fields of their own."""
    if isinstance(raw, RowError):
        return raw.raw
    return raw if isinstance(row, RowError) else row


def text_bytes(row: object) -> int:
    """About the UTF-8 size of a parsed row's text (characters; cheap, and exact for ASCII)."""
    if isinstance(row, str):
        return len(row)
    if isinstance(row, dict):
        return sum(text_bytes(v) for v in row.values())
    if isinstance(row, list):
        return sum(text_bytes(v) for v in row)
    return 0


def split_hash(seed: int, sample_id: str) -> int:
    """A row's seeded draw for the validation split: depends on its content, not its place in the file.
    The id is already a hash; an odd multiplier that depends on the seed permutes it (mod 2^64)."""
    return (int(sample_id, 16) * ((2 * seed + 1) * 0x9E3779B97F4A7C15 | 1)) & 0xFFFFFFFFFFFFFFFF


def normalise(row: object, spec: dict) -> tuple:
    plain = spec["plain"]
    if plain and spec["role"] != "pretrain":
        raise RowError("wrong_format", "plain text where a conversation was expected")
    if not plain and not isinstance(row, dict):
        raise RowError("not_object", f"row is a JSON {type(row).__name__}, not an object")
    if spec["role"] == "pretrain":
        text = to_text(row, spec["format"], spec["text_field"])
        return None, text, *sample_keys(text, spec["dedupe"]), 0
    conversation = to_conversation(row, spec["format"], spec["mapping"], spec["reasoning"], characters=False)
    if spec["system_prompt"] and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": spec["system_prompt"]})
    messages = orjson.dumps(conversation).decode()
    check_turn_characters(conversation, messages)
    return messages, None, *sample_keys(messages, spec["dedupe"]), len(conversation)


def row_format(row: object, spec: dict) -> str:
    """The format a row was read as (rows that normalised only): reported per source with counts."""
    if spec["role"] == "pretrain" or not isinstance(row, dict):
        return "text"
    if spec["mapping"]:
        return "columns"
    return spec["format"] if spec["format"] != "auto" else detect_format(row)


def sample_keys(body: str, dedupe: str) -> tuple[str, str | None]:
    return sample_key(body, "exact"), sample_key(body, "normalized") if dedupe == "normalized" else None


def preview(row: object, limit: int = 500) -> str | None:
    if row is None:
        return None
    if isinstance(row, bytes):
        return row[:limit].decode("utf-8", errors="replace")
    return json.dumps(row, ensure_ascii=False, default=str)[:limit]


def ordered_map(fn: Callable, items: Iterable, parallel: bool) -> Iterator:
    """fn over items in order; in worker processes when `parallel`, with at most two chunks per worker in
    flight so that a fast reader cannot pull the whole file into memory ahead of the workers."""
    if not parallel:
        yield from map(fn, items)
        return
    workers = max(1, min(os.cpu_count() or 1, 8))
    context = get_context("forkserver" if sys.platform != "win32" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
