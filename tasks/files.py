"""A source's files opened: each part checked, decompressed as it streams (a compressed file is never
inflated whole), its layout and byte-order mark told, and the content hash its cache entry is keyed on."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from pathlib import Path
from typing import BinaryIO

import orjson

from mixtune.core.cache import file_digest, fingerprint
from mixtune.core.datafiles import ARROW, DataPathError, Part, SourceFiles, describe, source_files

BLOCK_BYTES = 4 << 20  # JSONL is handed to workers in blocks of whole lines


class IngestError(RuntimeError):
    """A source that cannot be read at all: the message names the file."""


def checked_files(path: Path, split: str | None = None) -> SourceFiles:
    """The source's parts, each one readable: an error names the part and what is wrong with it."""
    try:
        files = source_files(path, split)
    except DataPathError as err:
        raise IngestError(str(err)) from None
    for part in files.parts:
        check_readable(part)
    return files


def check_readable(part: Part) -> None:
    try:
        size = part.path.stat().st_size
        with open_binary(part) as handle:
            handle.read(1)
    except DECOMPRESSION_ERRORS as err:  # gzip's BadGzipFile is an OSError too
        raise IngestError(f"{part.path}: not readable as {part.compression}: {err}") from None
    except OSError as err:
        raise IngestError(f"{part.path}: cannot read: {err.strerror or err}") from None
    if size == 0:
        raise IngestError(f"{part.path}: file is empty")


def source_digest(files: SourceFiles) -> str:
    """The content hash a source's cache entry is keyed on: a file's bytes as stored (a compressed file's
    compressed bytes), or a folder's parts by name and hash, so a renamed, added or changed shard counts."""
    if files.kind == "file":
        return file_digest(files.parts[0].path)
    return fingerprint(files.split, [(part.path.name, file_digest(part.path)) for part in files.parts])


def expansion(part: Part) -> int:
    """About how many bytes of rows a byte of the file holds: text compresses 3 to 5 times, and Parquet
    compresses its pages too (a 69 MiB JSONL file of conversations is 27 MiB of Parquet)."""
    if part.compression:
        return 4
    return 2 if part.suffix == ".parquet" else 1


def open_binary(part: Part) -> BinaryIO:
    """The part's bytes, decompressed as they are read: a compressed file is never inflated whole."""
    if part.compression is None:
        return part.path.open("rb")
    if part.compression == "zstd":
        zstandard = zstd_module(part)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(part.path.open("rb")), BLOCK_BYTES)
    opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[part.compression]
    return opener(part.path, "rb")


def zstd_module(part: Part):
    try:
        import zstandard
    except ImportError:
        raise IngestError(f"{part.path}: reading .zst needs the zstandard package (pip install zstandard)") from None
    return zstandard


def decompression_errors() -> tuple[type[Exception], ...]:
    """What a damaged or truncated compressed stream raises, by codec."""
    errors = [EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


DECOMPRESSION_ERRORS = decompression_errors()


UTF8_BOM = b"\xef\xbb\xbf"
# UTF-32 LE before UTF-16 LE: they share their first two bytes.
FOREIGN_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def has_utf8_bom(part: Part) -> bool:
    """A UTF-8 byte-order mark (Excel and Notepad write one) is stripped on reading and counted in the report;
    a UTF-16 or UTF-32 file is an error naming the file, not a file of quarantined rows."""
    if part.suffix in (".parquet", ARROW):
        return False
    with open_binary(part) as handle:
        head = handle.read(4)
    for mark, name in FOREIGN_BOMS.items():
        if head.startswith(mark):
            raise IngestError(f"{part.path}: encoded as {name} (byte-order mark {mark.hex()}); save it as UTF-8")
    return head.startswith(UTF8_BOM)


LAYOUTS = {".jsonl": "jsonl", ".json": "json list", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
LAYOUTS[ARROW] = "arrow"


def layout(part: Part) -> str:
    """How the file is laid out: its extension's, except a .json file that holds one record per line."""
    if part.suffix == ".json" and looks_like_jsonl(part):
        return "jsonl (named .json)"
    return LAYOUTS[part.suffix]


def source_layout(files: SourceFiles) -> str:
    return describe(files, layout(files.parts[0]))


def location_unit(part: Part) -> str:
    """What a row's number counts: lines of a JSONL or text file; records of a JSON list, a CSV file (a quoted
    cell may span lines), a Parquet or an Arrow file, where a line number would say "line 1" for every row."""
    return "line" if part.suffix == ".txt" or layout(part).startswith("jsonl") else "record"


def looks_like_jsonl(part: Part) -> bool:
    """A whole record on the first line and more after it: one JSON document cannot be that."""
    with open_binary(part) as handle:
        first = handle.readline(BLOCK_BYTES).removeprefix(UTF8_BOM).strip()
        more = any(line.strip() for line in iter(lambda: handle.readline(BLOCK_BYTES), b""))
    try:
        return more and first.startswith(b"{") and isinstance(orjson.loads(first), dict)
    except orjson.JSONDecodeError:
        return False
