"""A UTF-8 byte-order mark is stripped in every text format (nothing lost, counted in the report); a JSONL
file named .json is read as JSONL; UTF-16 is an error naming the file."""

import csv
import json

import pandas as pd
import pytest

from tasks.data_report import build_report, markdown
from tasks.ingest import IngestError, ingest
from tests.test_ingest import config_with

ROWS = [{"instruction": f"Dose of drug {i}?", "output": f"{i} mg twice a day."} for i in range(12)]
BOM = b"\xef\xbb\xbf"


def write(path, fmt: str) -> None:
    if fmt == "jsonl":
        body = "\n".join(json.dumps(r) for r in ROWS) + "\n"
    elif fmt == "json":
        body = json.dumps(ROWS)
    else:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["instruction", "output"])
            writer.writeheader()
            writer.writerows(ROWS)
        body = path.read_text(encoding="utf-8")
    path.write_bytes(BOM + body.encode("utf-8"))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_bom_in_conversation_formats_loses_nothing(tmp_path, fmt):
    path = tmp_path / f"domain.{fmt}"
    write(path, fmt)
    columns = {"columns": {"prompt": "instruction", "response": "output"}} if fmt == "csv" else {}
    result = ingest(config_with(tmp_path, path, **columns))
    stats = result.stats[str(path)]
    assert stats.rows_read == stats.accepted == len(ROWS) and stats.quarantined == 0
    assert stats.utf8_bom is True
    samples = pd.read_parquet(result.samples)
    prompts = {json.loads(m)[0]["content"] for m in samples[samples["source"] == str(path)]["messages"]}
    assert prompts == {r["instruction"] for r in ROWS}  # the first row's key is not spoilt by the mark


def test_bom_in_a_text_file_loses_nothing(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(BOM + b"First document.\nSecond document.\n")
    config = config_with(tmp_path, write_domain(tmp_path))
    config.data.sources.append(type(config.data.sources[0])(path=str(path), role="pretrain"))
    result = ingest(config)
    samples = pd.read_parquet(result.samples)
    assert sorted(samples[samples["source"] == str(path)]["text"]) == ["First document.", "Second document."]
    assert result.stats[str(path)].utf8_bom is True
    assert result.stats[str(path)].quarantined == 0


def test_jsonl_named_json_is_read_as_jsonl_and_reported(tmp_path):
    path = tmp_path / "domain.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    result = ingest(config_with(tmp_path, path))
    stats = result.stats[str(path)]
    assert stats.accepted == len(ROWS) and stats.layout == "jsonl (named .json)"
    report = markdown(build_report(result, type("T", (), {"stats": {"sft": {}, "pretrain": {}}})()), 128)
    assert f"{path} (jsonl (named .json); alpaca 12)" in report


def test_utf16_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "domain.jsonl"
    path.write_bytes("\n".join(json.dumps(r) for r in ROWS).encode("utf-16"))
    with pytest.raises(IngestError, match="encoded as UTF-16") as err:
        ingest(config_with(tmp_path, path))
    assert str(path) in str(err.value) and "save it as UTF-8" in str(err.value)


def write_domain(tmp_path):
    path = tmp_path / "domain.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    return path
