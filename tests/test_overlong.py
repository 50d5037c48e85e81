"""Rows rejected at tokenising (overlong, no labels) are counted per source in the report and toward
max_quarantine_fraction."""

import json

import pytest

from tasks.base_model import prepare_tokenizer
from tasks.data_report import build_report, check_quarantine, markdown
from tasks.ingest import IngestError, ingest
from tasks.tokenize import tokenize
from tests.test_ingest import config_with


def test_overlong_rejects_count_toward_the_quarantine_fraction(tmp_path):
    rows = [{"instruction": f"Short question {i}?", "output": f"Short answer {i}."} for i in range(40)]
    for row in rows[:24]:  # 60% of the rows are far longer than max_seq_len
        row["output"] = " ".join(["a much longer answer that keeps going"] * 20)
    domain = tmp_path / "domain.jsonl"
    domain.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = config_with(tmp_path, domain)
    config.data.overlong, config.model.max_seq_len, config.data.max_quarantine_fraction = "reject", 64, 0.5
    data = ingest(config)
    assert data.stats[str(domain)].quarantined == 0  # ingest alone sees nothing wrong
    tokenizer = prepare_tokenizer(config, data.samples, data.key)
    tokens = tokenize(data.samples, data.key, tokenizer, 64, config.run.output_dir, "reject")
    report = {r["source"]: r for r in build_report(data, tokens)}[str(domain)]
    assert report["quarantined_by_reason"]["too_long"] >= 24 * 0.9  # a few long rows went to validation
    assert report["accepted"] + report["duplicates"] + report["quarantined"] == report["rows_read"] == 40
    assert "too_long" in markdown([report], 64)
    with pytest.raises(IngestError, match="max_quarantine_fraction 50%") as err:
        check_quarantine([report], 0.5)
    assert str(domain) in str(err.value) and "too_long" in str(err.value)
    check_quarantine([report], 0.9)  # within a looser limit: no error
