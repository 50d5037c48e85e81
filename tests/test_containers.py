"""Sources as people publish them: compressed files, folders of shards, and `datasets` save_to_disk folders.
Every row is still accounted for, and a bad row is named with the shard that holds it and its line."""

import bz2
import gzip
import hashlib
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixtune.core.config import ConfigError, validate_config
from tasks.ingest import IngestError, ingest
from tasks.keys import source_fingerprint
from tests.conftest import tiny_raw_config

BROKEN = b'{"messages": [{"role": "user", "content": "cut off'


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def compress(data: bytes, codec: str) -> bytes:
    if codec == "zst":
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor().compress(data)
    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec](data)


def domain_config(tmp_path: Path, path: Path, data: dict | None = None, **source):
    """`path` as the domain source (or beside it, with role: pretrain)."""
    raw = tiny_raw_config(tmp_path / "runs", data=data or {})
    entry = {"path": str(path), "role": "domain", **source}
    if entry["role"] == "pretrain":
        raw["data"]["sources"].append(entry)
    else:
        raw["data"]["sources"][1] = entry
    return validate_config(raw, "test config", base_dir=tmp_path)


def read(tmp_path: Path, path: Path, data: dict | None = None, **source) -> tuple[dict, list[dict]]:
    result = ingest(domain_config(tmp_path, path, data, **source))
    stats = result.stats[str(path)]
    assert stats.accepted + stats.duplicates + stats.quarantined == stats.rows_read
    quarantined = [json.loads(line) for line in Path(result.quarantine).read_text().splitlines()]
    return stats, [q for q in quarantined if q["file"].startswith(str(path))]


@pytest.mark.parametrize("codec, name", [("gz", "gzip"), ("zst", "zstd"), ("bz2", "bzip2"), ("xz", "xz")])
def test_compressed_jsonl_is_read_with_bad_rows_named_by_line(tmp_path, codec, name):
    rows = [conversation(i) for i in range(12)]
    rows[4], rows[9] = BROKEN, conversation(2)  # line 5 broken, line 10 a duplicate of line 3
    path = tmp_path / f"domain.jsonl.{codec}"
    path.write_bytes(compress(jsonl(rows), codec))
    stats, quarantined = read(tmp_path, path)
    assert (stats.rows_read, stats.accepted, stats.duplicates, stats.quarantined) == (12, 10, 1, 1)
    assert stats.layout == f"jsonl, {name}" and stats.formats == {"openai": 11}  # duplicates included
    [bad] = quarantined
    assert (bad["file"], bad["line"], bad["reason"]) == (str(path), 5, "invalid_json")
    assert bad["row"] == BROKEN.decode()


def test_a_long_line_in_a_compressed_file_is_read_past_not_held(tmp_path):
    rows = [conversation(i) for i in range(6)]
    rows[2] = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "domain.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(rows)))
    stats, [bad] = read(tmp_path, path, data={"max_row_bytes": 1000})
    assert (bad["line"], bad["reason"], bad["row"]) == (3, "too_large", None)
    assert stats.accepted == 5


@pytest.mark.parametrize(
    "name, content, role, unit",
    [
        ("domain.json.gz", json.dumps([conversation(0), [1], conversation(1)]).encode(), "domain", "record"),
        ("domain.csv.xz", b"question,answer\nq1,a1\nq2,\nq3,a3\n", "domain", "record"),
        ("notes.txt.bz2", b"first document\n\nsecond\x00document\nthird\n", "pretrain", "line"),
    ],
)
def test_compressed_json_csv_and_text_are_read(tmp_path, name, content, role, unit):
    path = tmp_path / name
    path.write_bytes({"gz": gzip.compress, "xz": lzma.compress, "bz2": bz2.compress}[name.rsplit(".", 1)[1]](content))
    extra = {"columns": {"prompt": "question", "response": "answer"}} if ".csv" in name else {}
    stats, [bad] = read(tmp_path, path, role=role, **extra)
    assert (stats.rows_read, stats.accepted, stats.quarantined) == (3, 2, 1)
    assert bad[unit] in (2, 3) and bad["file"] == str(path)


def test_the_cache_key_is_the_hash_of_the_compressed_bytes(tmp_path):
    path = tmp_path / "domain.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl([conversation(i) for i in range(3)])))
    config = domain_config(tmp_path, path)
    assert source_fingerprint(config.data.sources[1], 0)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def parquet_shards(folder: Path, rows: list[dict], shards: int = 4) -> list[Path]:
    folder.mkdir()
    size = len(rows) // shards
    paths = []
    for k in reversed(range(shards)):  # written out of order: read in name order all the same
        paths.append(folder / f"train-{k:05d}-of-{shards:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[k * size : (k + 1) * size]), paths[-1])
    (folder / "README.md").write_text("not data")
    return sorted(paths)


def test_a_folder_of_parquet_shards_is_one_source_and_names_the_shard_of_a_bad_row(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(16)]
    rows[6]["answer"] = " "  # shard 1, record 3
    rows[13] = dict(rows[1])  # shard 3 repeats shard 0's record 2
    folder = tmp_path / "data"
    shards = parquet_shards(folder, rows)
    stats, [bad] = read(tmp_path, folder)
    assert (stats.rows_read, stats.accepted, stats.duplicates, stats.quarantined) == (16, 14, 1, 1)
    assert stats.layout == "parquet, 4 shards" and stats.formats == {"pair question/answer": 15}
    assert stats.shards == [p.name for p in shards]
    assert (bad["file"], bad["record"], bad["reason"]) == (str(shards[1]), 3, "empty_content")


def test_a_folder_of_compressed_jsonl_shards_names_shard_and_line(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        rows = [conversation(10 * k + i) for i in range(5)]
        if k == 2:
            rows[3] = BROKEN
        (folder / f"part-{k}.jsonl.gz").write_bytes(gzip.compress(jsonl(rows)))
    stats, [bad] = read(tmp_path, folder)
    assert (stats.rows_read, stats.accepted, stats.quarantined) == (15, 14, 1)
    assert stats.layout == "jsonl, gzip, 3 shards"
    assert (Path(bad["file"]).name, bad["line"]) == ("part-2.jsonl.gz", 4)


def test_a_folder_whose_every_row_is_bad_names_the_shard_in_the_error(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl([{"foo": 1}, {"bar": 2}]))
    with pytest.raises(IngestError, match=r"no row in a usable format; .*a\.jsonl line 1"):
        ingest(domain_config(tmp_path, folder))


@pytest.mark.parametrize(
    "files, field, message",
    [
        ({"a.jsonl": b"{}\n", "b.parquet": b"PAR1"}, "path", "shards of mixed formats (1 .jsonl, 1 .parquet)"),
        ({"README.md": b"hi", "notes.docx": b"x"}, "path", "a folder with no readable shard"),
        ({}, "path", "a folder with no readable shard"),
    ],
)
def test_an_unusable_folder_is_refused_naming_the_field_and_path(tmp_path, files, field, message):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    with pytest.raises(ConfigError) as err:
        domain_config(tmp_path, folder)
    assert f"data.sources.1.{field}: {folder}: {message}" in str(err.value)


def save_to_disk(folder: Path, shards: list[list[dict]], split: str = "train") -> None:
    """What datasets' Dataset.save_to_disk writes: Arrow IPC streams, state.json naming them, dataset_info.json."""
    folder.mkdir(parents=True)
    names = [f"data-{k:05d}-of-{len(shards):05d}.arrow" for k in range(len(shards))]
    for name, rows in zip(names, shards):
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": n} for n in names], "_split": split, "_format_type": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_a_datasets_folder_is_read_from_its_arrow_files(tmp_path):
    # columnar: every row has every column, and a missing value is a null
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "chosen": None, "rejected": None} for i in range(8)]
    rows[5] = {"prompt": "p5", "completion": None, "chosen": "c", "rejected": "r"}
    folder = tmp_path / "saved"
    save_to_disk(folder, [rows[:4], rows[4:]])
    stats, [bad] = read(tmp_path, folder)
    assert (stats.rows_read, stats.accepted, stats.quarantined) == (8, 7, 1)
    assert stats.layout == "datasets arrow, 2 shards" and stats.formats == {"prompt_completion": 7}
    assert (Path(bad["file"]).name, bad["record"], bad["reason"]) == ("data-00001-of-00002.arrow", 2, "preference_row")


def test_a_datasets_dict_folder_needs_its_split_named(tmp_path):
    folder = tmp_path / "dict"
    save_to_disk(folder / "train", [[conversation(i) for i in range(6)]])
    save_to_disk(folder / "test", [[conversation(i) for i in range(100, 103)]], "test")
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ConfigError, match=r"data\.sources\.1\.split: .*splits train, test: set split to one"):
        domain_config(tmp_path, folder)
    with pytest.raises(ConfigError, match=r"data\.sources\.1\.split: .*no split 'dev'"):
        domain_config(tmp_path, folder, split="dev")
    stats, quarantined = read(tmp_path, folder, split="test")
    assert (stats.rows_read, stats.accepted, quarantined) == (3, 3, [])
    assert stats.layout == "datasets arrow, split test, 1 shard"


def test_split_on_a_plain_file_is_refused(tmp_path):
    path = tmp_path / "domain.jsonl"
    path.write_bytes(jsonl([conversation(0)]))
    with pytest.raises(ConfigError, match=r"data\.sources\.1\.split: .*split is for a datasets folder"):
        domain_config(tmp_path, path, split="train")
