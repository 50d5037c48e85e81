"""List fields in a prompt_template ({laws} joined by newlines, {laws[0]}), and `explode` of a list of
{input, output} records into one sample each, counted in the report."""

import json

import pandas as pd
import pytest

from mixtune.core.config import Columns
from tasks.data_report import read_as, source_report
from tasks.formats import RowError, mapped_turns
from tasks.ingest import ingest
from tasks.records import Exploded
from tests.test_ingest import config_with

ROW = {"query": "Is this contract valid?", "laws": ["Civil Code 143", "Civil Code 153"], "answer": "Yes.", "id": 7}


def prompt(template: str, row=ROW) -> str:
    return mapped_turns(row, Columns(prompt_template=template, response="answer").model_dump())[0]["content"]


def test_a_list_field_is_joined_by_newlines_or_indexed():
    assert prompt("{query}\nLaws:\n{laws}") == "Is this contract valid?\nLaws:\nCivil Code 143\nCivil Code 153"
    assert prompt("{query} ({laws[1]})") == "Is this contract valid? (Civil Code 153)"
    assert prompt("{query}") == "Is this contract valid?"  # an unused list (and an int id) is no error
    with pytest.raises(RowError, match="has no item 5"):
        prompt("{laws[5]}")
    with pytest.raises(RowError, match=r"laws\[0\] is a dict"):
        prompt("{laws}", {**ROW, "laws": [{"article": 1}]})


def test_explode_gives_one_sample_per_instance_and_counts_it(tmp_path):
    rows = [
        {
            "instruction": f"Task {i}: add the numbers.",
            "instances": [{"input": f"{i} + {k}", "output": str(i + k)} for k in range(3)],
        }
        for i in range(10)
    ]
    rows.append({"instruction": "Broken task", "instances": "not a list"})
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    columns = {"prompt_template": "{instruction}\n{input}", "response": "output", "explode": "instances"}
    result = ingest(config_with(tmp_path, path, columns=columns))
    stats = result.stats[str(path)]
    assert stats.exploded == Exploded(field="instances", rows=11, samples=31)
    assert stats.accepted == 30 and stats.quarantined_by_reason == {"wrong_type": 1}
    samples = pd.read_parquet(result.samples)
    conversations = [json.loads(m) for m in samples[samples["source"] == str(path)]["messages"]]
    assert {"content": "Task 4: add the numbers.\n4 + 2", "role": "user"} in [c[0] for c in conversations]
    assert "instances exploded: 11 rows into 31 samples" in read_as(source_report(str(path), stats, None))
