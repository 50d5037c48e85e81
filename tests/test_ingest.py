import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.ingest import IngestError, ingest
from tests.conftest import tiny_config

GOOD = {"conversations": [{"role": "user", "content": "q{}"}, {"role": "assistant", "content": "a{}"}]}


def good_row(i: int) -> str:
    return json.dumps(GOOD).replace("{}", str(i))


def config_with(tmp_path, domain_path, **source):
    config = tiny_config(tmp_path)
    config.data.sources[1] = type(config.data.sources[1])(path=str(domain_path), role="domain", **source)
    return config


def test_malformed_line_is_quarantined_and_counted(tmp_path):
    lines = [good_row(i) for i in range(20)]
    lines[7] = '{"conversations": [{"role": "user", "content": "broken"'
    lines[12] = good_row(3)  # exact duplicate of line 4
    path = tmp_path / "domain.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = ingest(config_with(tmp_path, path))
    stats = result.stats[str(path)]
    assert stats.rows_read == 20
    assert (stats.accepted, stats.duplicates, stats.quarantined) == (18, 1, 1)
    assert stats.accepted + stats.duplicates + stats.quarantined == stats.rows_read
    quarantined = [json.loads(line) for line in Path(result.quarantine).read_text().splitlines()]
    assert len(quarantined) == 1
    assert quarantined[0]["line"] == 8 and quarantined[0]["reason"] == "invalid_json"
    assert quarantined[0]["row"] == lines[7]  # the line as the file holds it, not the parser's message
    assert quarantined[0]["file"] == str(path)


def test_json_list_and_mixed_formats_per_row(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    rows += [{"messages": [{"role": "user", "content": "m"}, {"role": "assistant", "content": "n"}]}, [1]]
    path = tmp_path / "domain.json"
    path.write_text(json.dumps(rows))
    result = ingest(config_with(tmp_path, path))
    stats = result.stats[str(path)]
    assert (stats.accepted, stats.quarantined) == (11, 1)
    assert stats.quarantined_by_reason == {"not_object": 1}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("domain.jsonl", b"", "file is empty"),
        ("domain.jsonl", b'{"foo": 1}\n{"bar": 2}\n', "no row in a usable format"),
        ("domain.json", b"[1, 2", "not a valid JSON document"),
        (
            "domain.jsonl.gz",
            gzip.compress(b"".join(good_row(i).encode() + b"\n" for i in range(50)), mtime=0)[:-30],
            "damaged gzip",
        ),
        ("domain.jsonl.gz", b"not gzip at all", "not readable as gzip"),
        ("domain.parquet.gz", gzip.compress(b"PAR1", mtime=0), "Parquet compresses inside the file"),
    ],
)
def test_unusable_file_is_a_clear_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(IngestError, match=message) as err:
        ingest(config_with(tmp_path, path))
    assert str(path) in str(err.value)


def test_wrong_extension_is_rejected(tmp_path):
    path = tmp_path / "domain.csvx"
    path.write_text("a,b\n")
    with pytest.raises(IngestError, match="unsupported extension"):
        ingest(config_with(tmp_path, path))


def test_split_is_seeded_and_cached_by_content(tmp_path):
    config = tiny_config(tmp_path)
    first = ingest(config)
    again = ingest(config)
    assert first.key == again.key
    frame = pd.read_parquet(first.samples)
    assert set(frame["split"]) == {"train", "val"}
    for stats in first.stats.values():
        assert stats.accepted + stats.duplicates + stats.quarantined == stats.rows_read
        assert stats.val == round(0.15 * stats.accepted) or stats.val == round(0.1 * stats.accepted)
    reseeded = tiny_config(tmp_path / "other", run={"seed": 1, "output_dir": str(tmp_path / "other")})
    assert ingest(reseeded).key != first.key


def test_trl_rows_are_read_and_their_refusals_counted(tmp_path):
    def chat(i):
        return {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}],
            "completion": [{"role": "assistant", "content": f"a{i}"}],
        }

    rows = [chat(i) for i in range(6)] + [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    rows += [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "only"}, chat(0)]
    path = tmp_path / "domain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = ingest(config_with(tmp_path, path)).stats[str(path)]
    assert (stats.rows_read, stats.accepted, stats.duplicates, stats.quarantined) == (12, 9, 1, 2)
    assert stats.formats == {"prompt_completion_chat": 7, "prompt_completion": 3}
    assert stats.quarantined_by_reason == {"preference_row": 1, "prompt_only": 1}
