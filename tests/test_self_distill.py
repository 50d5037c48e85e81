"""data.self_distill: the base model's rewrites of the domain answers replace them in training, except rewrites
that drop the reference's numbers, loop or are cut short: those are quarantined with their reason and the
original kept. Generated once per model and prompts, like the rehearsal's answers."""

import json

import pandas as pd
import pytest

import tasks.own_answers as own_answers_module
from tasks.answers import numbers_in
from tasks.distill import REWRITES, distill, rewrite_problem
from tasks.ingest import ingest
from tasks.inputs import input_hash
from tasks.keys import ingest_key
from tests.conftest import tiny_config, tiny_hf_model

FACTS = [("How many legs does a spider have?", "A spider has 8 legs."), ("Name a colour.", "Blue is a colour.")]


def domain_file(folder) -> str:
    """40 single-turn rows: the spider's answer states a number, the colour's none."""
    path = folder / "domain.jsonl"
    rows = [{"prompt": f"{q} (case {i})", "completion": a} for i in range(20) for q, a in FACTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reference_of(prompt: str) -> str:
    return prompt.split("### Reference Answer:\n", 1)[1].split("\n\n### Response:", 1)[0]


def scripted_rewrites(model_dir, base_dir, asked, batch_size, time_bound_s=None, max_new_tokens=0, label=""):
    """The spider's rewrite loses its number; every other one keeps its reference's content."""
    replies = []
    for a in asked:
        reference = reference_of(a["prompt"][-1]["content"])
        text = "A spider has many legs." if "spider" in reference else f"In other words: {reference}"
        replies.append({**a, "answer": text, "cut": False, "ended": True})
    return replies


def test_a_rewrite_that_drops_the_references_numbers_is_quarantined_and_the_original_kept(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        own_answers_module, "answer_probes", lambda *a, **k: calls.append(len(a[2])) or scripted_rewrites(*a, **k)
    )
    sources = [
        {"synthetic": "general", "samples": 60, "role": "general"},
        {"path": domain_file(tmp_path), "role": "domain", "val_fraction": 0.2},
    ]
    config = tiny_config(tmp_path, data={"sources": sources, "self_distill": True})
    data, base = ingest(config), str(tiny_hf_model(tmp_path / "base"))
    result = distill(config, data, base)

    before, after = pd.read_parquet(data.samples), pd.read_parquet(result.samples)
    assert list(after["sample_id"]) == list(before["sample_id"]) and list(after["split"]) == list(before["split"])
    answers = {
        row.sample_id: (json.loads(row.messages)[-1]["content"], json.loads(old)[-1]["content"], row.split, row.tag)
        for row, old in zip(after.itertuples(), before["messages"])
    }
    rewritten = [(now, was) for now, was, split, tag in answers.values() if tag == "domain" and split == "train"]
    assert rewritten and all(
        now == (was if "spider" in was else f"In other words: {was}") for now, was in rewritten
    )  # the spider keeps its original answer, the colour gets the rewrite
    assert all(now == was for now, was, split, tag in answers.values() if split == "val" or tag != "domain")
    judged = [json.loads(line) for line in (tmp_path / result.folder / REWRITES).read_text().splitlines()]
    spiders = [r for r in judged if "spider" in r["reference"]]
    assert spiders and all(r["reason"] == "dropped_numbers" and "8" in r["message"] for r in spiders)
    assert len(judged) == len(rewritten) and sum(r["reason"] is None for r in judged) == len(judged) - len(spiders)
    assert result.stats == data.stats and result.quarantine == data.quarantine  # the same rows, counted alike

    again = distill(config, data, base)
    assert calls == [len(rewritten)] and again == result  # the second reads the cached rewrites


def test_a_rewrite_is_judged_by_the_references_numbers_its_length_and_its_loops():
    reference = "It costs 1,200.50 dollars and takes 3-4 days."
    assert numbers_in(reference) == {"1200.5", "3", "4"}
    assert rewrite_problem("Expect 3 to 4 days and a price of 1200.5 dollars.", reference, True, 64) is None
    assert rewrite_problem("It takes 3 to 4 days.", reference, True, 64)[0] == "dropped_numbers"
    assert rewrite_problem("", reference, True, 64)[0] == "empty_answer"
    assert rewrite_problem("It costs 1200.5 dollars for 3 or 4 days", reference, False, 64)[0] == "unfinished"
    assert rewrite_problem("again and " * 12, "again", True, 64)[0] == "degenerate_answer"


def test_the_switch_is_part_of_the_run_inputs_but_not_of_what_ingest_reads(tmp_path):
    plain, distilled = tiny_config(tmp_path), tiny_config(tmp_path, data={"self_distill": True})
    assert ingest_key(plain) == ingest_key(distilled)
    assert input_hash(plain) != input_hash(distilled)


@pytest.mark.parametrize("tokens", [0, 5000])
def test_the_generation_bound_is_checked(tmp_path, tokens):
    from mixtune.core.config import ConfigError

    with pytest.raises(ConfigError, match="data.self_distill_tokens"):
        tiny_config(tmp_path, data={"self_distill": True, "self_distill_tokens": tokens})


@pytest.mark.e2e
def test_the_flow_trains_on_the_rewrites_and_records_them(prefect_harness, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.finetune import finetune

    monkeypatch.setattr(own_answers_module, "answer_probes", scripted_rewrites)
    sources = [
        {"synthetic": "general", "samples": 200, "role": "general"},
        {"path": domain_file(tmp_path), "role": "domain", "val_fraction": 0.2},
    ]
    config = tiny_config(
        tmp_path,
        data={"sources": sources, "self_distill": True},
        schedule={"stages": 1, "samples_per_stage": 32},
        validation={"forgetting_budget": 10.0},
    )
    summary = finetune(config)

    tables = sorted(tmp_path.rglob("sft.parquet"))
    assert len(summary.stages) == 1 and len(tables) == 2  # tokenised before the base model, then with the rewrites
    domain_train = [("tag", "==", "domain"), ("split", "==", "train")]
    first, second = (pd.read_parquet(p, columns=["sample_id", "input_ids"], filters=domain_train) for p in tables)
    both = first.merge(second, on="sample_id")
    changed = sum(list(a) != list(b) for a, b in zip(both["input_ids_x"], both["input_ids_y"]))
    client = MlflowClient(summary.tracking_uri)
    metrics = client.get_run(summary.parent_run_id).data.metrics
    spiders = metrics["self_distill_quarantined/dropped_numbers"]
    assert spiders > 0 and metrics["self_distill_rewritten"] + spiders == metrics["self_distill_rows"] == len(both)
    assert changed == metrics["self_distill_rewritten"]  # what trained: the accepted rewrites, the spiders' originals
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id, "data/self_distill")}
    assert artifacts == {"data/self_distill/rewrites.jsonl"}
