"""Which files a data source is: one file (maybe compressed), a folder of shards of one format, or a folder
that `datasets` wrote with save_to_disk (Arrow). Names only, no rows: the config checks a source's path with
it before any work, and ingest reads the parts it lists, in this order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ARROW = ".arrow"
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}
COMPRESSIBLE = (".jsonl", ".json", ".csv", ".txt")  # Parquet and Arrow compress inside the file
DATASET_DICT, DATASET_STATE = "dataset_dict.json", "state.json"
MAX_METADATA_BYTES = 1 << 20


class DataPathError(ValueError):
    """A source path that names no data mixtune can read; `field` is the source's config field at fault."""

    def __init__(self, message: str, field: str = "path"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Part:
    """One file of a source: `suffix` is its format's extension, `compression` None or a COMPRESSIONS value."""

    path: Path
    suffix: str
    compression: str | None = None


@dataclass(frozen=True)
class SourceFiles:
    kind: str  # "file", "shards" or "datasets"
    parts: tuple[Part, ...]
    split: str | None = None


def part_of(path: Path) -> Part | None:
    """A file's format from its name: `train.jsonl.gz` is gzip-compressed JSONL; None: not a data file."""
    compression = COMPRESSIONS.get(path.suffix)
    suffix = Path(path.stem).suffix if compression else path.suffix
    if suffix in (COMPRESSIBLE if compression else (*FORMATS, ARROW)):
        return Part(path, suffix, compression)
    return None


def file_part(path: Path) -> Part:
    part = part_of(path)
    if part is not None:
        return part
    if path.suffix in COMPRESSIONS:
        inner = Path(path.stem).suffix or "(none)"
        raise DataPathError(
            f"{path}: a {COMPRESSIONS[path.suffix]} file of unsupported format {inner!r} "
            f"(compressed: {', '.join(s + path.suffix for s in COMPRESSIBLE)}; Parquet compresses inside the file)"
        )
    known = ", ".join((*FORMATS, *(f".jsonl{c}" for c in COMPRESSIONS)))
    raise DataPathError(f"{path}: unsupported extension {path.suffix!r} (use {known}, or a folder of them)")


def source_files(path: Path, split: str | None = None) -> SourceFiles:
    if not path.is_dir():
        if split is not None:
            raise DataPathError(f"{path}: split is for a datasets folder with several splits", "split")
        return SourceFiles("file", (file_part(path),))
    if (path / DATASET_DICT).is_file():
        return dataset_dict(path, split)
    if split is not None:
        raise DataPathError(f"{path}: split is for a datasets folder with several splits ({DATASET_DICT})", "split")
    if (path / DATASET_STATE).is_file():
        return SourceFiles("datasets", dataset_parts(path))
    return SourceFiles("shards", shard_parts(path))


def shard_parts(folder: Path) -> tuple[Part, ...]:
    """Every data file directly in the folder, in name order (train-00000-of-00004 ... comes out in sequence);
    other files (a README, a LICENSE) are not data and are left alone."""
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
    parts = tuple(part for part in map(part_of, files) if part is not None)
    if not parts:
        held = ", ".join(p.name for p in sorted(folder.iterdir())[:6]) or "nothing"
        raise DataPathError(
            f"{folder}: a folder with no readable shard ({', '.join(FORMATS)}, compressed or not, or {ARROW}); "
            f"it holds {held}"
        )
    kinds = sorted({part.suffix for part in parts})
    if len(kinds) > 1:
        counts = ", ".join(f"{sum(p.suffix == k for p in parts)} {k}" for k in kinds)
        raise DataPathError(f"{folder}: shards of mixed formats ({counts}); a source folder holds one format")
    return parts


def dataset_parts(folder: Path) -> tuple[Part, ...]:
    """A save_to_disk Dataset: its state.json lists its Arrow files in order."""
    state = metadata(folder / DATASET_STATE)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
        raise DataPathError(f"{folder / DATASET_STATE}: no _data_files list of {{filename}}: not a datasets folder")
    parts = []
    for entry in files:
        file = folder / str(entry["filename"])
        if file.parent != folder or not file.is_file():
            raise DataPathError(f"{folder}: {DATASET_STATE} lists {entry['filename']!r}, which is not in the folder")
        parts.append(Part(file, ARROW))
    if not parts:
        raise DataPathError(f"{folder}: {DATASET_STATE} lists no Arrow file")
    return tuple(parts)


def dataset_dict(folder: Path, split: str | None) -> SourceFiles:
    """A save_to_disk DatasetDict: one sub-folder per split; `split` names one unless there is only one."""
    splits = metadata(folder / DATASET_DICT)
    splits = splits.get("splits") if isinstance(splits, dict) else None
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise DataPathError(f"{folder / DATASET_DICT}: no list of splits")
    if split is None and len(splits) > 1:
        raise DataPathError(f"{folder}: a datasets folder with splits {', '.join(splits)}: set split to one", "split")
    chosen = split or splits[0]
    if chosen not in splits:
        raise DataPathError(f"{folder}: no split {chosen!r} (it holds {', '.join(splits)})", "split")
    return SourceFiles("datasets", dataset_parts(folder / chosen), chosen)


def metadata(path: Path) -> object:
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise DataPathError(f"{path}: over {MAX_METADATA_BYTES:,} bytes, not a datasets metadata file")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataPathError(f"{path}: not readable datasets metadata: {err}") from None


def describe(files: SourceFiles, part_layout: str) -> str:
    """How the report names the source's layout: `jsonl, gzip`, `parquet, 4 shards`, `datasets arrow, split
    train, 2 shards`; `part_layout` is what its first part holds."""
    compressions = sorted({p.compression for p in files.parts if p.compression})
    text = part_layout + "".join(f", {c}" for c in compressions)
    if files.kind == "datasets":
        text = "datasets " + text + (f", split {files.split}" if files.split else "")
    if files.kind != "file":
        text += f", {len(files.parts)} shard{'s' if len(files.parts) > 1 else ''}"
    return text
