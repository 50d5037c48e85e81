"""Needs ../shared/data (CI has it; a fresh clone may not): every file in its MANIFEST.tsv ingests, with
column mappings where the records have their own keys, and yields exactly the manifest's record count."""

import csv
from pathlib import Path

import pytest

from mixtune.core.config import validate_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "MANIFEST.tsv").is_file(), reason="needs ../shared/data")

# Files whose records are not one of the known formats: how their fields become a conversation.
MAPPINGS = {
    "domain_law_zh_disc_qa.json": {"prompt": "input", "response": "output"},
    "domain_law_zh_disc_mcq.csv": {"prompt_template": "{input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}", "response": "output"},
}


def manifest() -> list[dict]:
    with open(SHARED / "MANIFEST.tsv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def source_for(entry: dict) -> dict:
    role = entry["role"].split(":")[0].split(" ")[0]
    source = {"path": str(SHARED / entry["file"]), "role": role}
    if entry["file"] in MAPPINGS:
        source["columns"] = MAPPINGS[entry["file"]]
    return source


def test_every_manifest_file_ingests_with_the_manifests_record_count(tmp_path):
    from tasks.ingest import ingest

    entries = manifest()
    raw = {"run": {"output_dir": str(tmp_path)}, "data": {"sources": [source_for(e) for e in entries]}}
    result = ingest(validate_config(raw, "shared-data config", base_dir=tmp_path))
    for entry in entries:
        stats = result.stats[str(SHARED / entry["file"])]
        assert stats.rows_read == int(entry["records"]), entry["file"]
        assert stats.accepted + stats.duplicates + stats.quarantined == stats.rows_read
        assert stats.accepted > 0.9 * stats.rows_read, (entry["file"], stats.quarantined_by_reason)
