"""data.rehearsal: self: the general source answered by the base model itself, quarantined, split, cached,
reported and used for the general validation like any general source."""

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import tasks.own_answers as own_answers_module
from mixtune.core.config import ConfigError, SelfRehearsal
from tasks.ingest import ingest
from tasks.keys import BUNDLED_PROMPTS
from tasks.readers import IngestError
from tasks.rehearse import (
    LABEL,
    MIN_HELD_OUT,
    asked_prompts,
    judge,
    planned_sizes,
    quarantine_reason,
    read_prompts,
    refuse_too_few_held_out,
    rehearse,
    split,
)
from tasks.sources import dominant_script as script_of
from tasks.sources import script_mix
from tests.conftest import tiny_config, tiny_hf_model, tiny_raw_config
from tests.records import source_stats

DOMAIN_ONLY = [{"synthetic": "domain", "samples": 200, "role": "domain", "val_fraction": 0.15}]


def answer(line: int, text: str, prompt: str | None = None) -> dict:
    return {"line": line, "prompt": prompt or f"prompt {line}", "answer": text, "ended": True}


def test_empty_degenerate_and_duplicate_answers_are_quarantined_with_their_reason():
    answers = [
        answer(1, "Paris is the capital of France."),
        answer(2, "   \n"),
        answer(3, "the loop " * 12),
        answer(4, "我是我是我是我是我是我是我是我是我是我是"),
        answer(5, "paris is the capital of france"),  # case and punctuation aside, answer 1 again
        answer(6, "Water boils at 100 degrees Celsius at sea level."),
    ]
    accepted, quarantined, duplicates = judge(answers, "answers.jsonl", set())
    assert [r["line"] for r in accepted] == [1, 6] and duplicates == 0
    reasons = {r["line"]: r["reason"] for r in quarantined}
    assert reasons == {2: "empty_answer", 3: "degenerate_answer", 4: "degenerate_answer", 5: "duplicate_answer"}
    duplicate = next(r for r in quarantined if r["line"] == 5)
    assert "line 1" in duplicate["message"] and duplicate["file"] == "answers.jsonl" and duplicate["field"] == "answer"
    assert "paris is the capital of france" in duplicate["row"]  # the answer itself is kept for a person to read


def test_prose_in_both_languages_and_a_repeated_sentence_pass_the_repetition_rule():
    fine = [
        "Air molecules scatter short blue wavelengths of sunlight far more than red ones, so the sky looks blue.",
        "天空看起来是蓝色的，是因为大气中的分子对波长较短的蓝光散射得更强。",
        "星期一、星期二、星期三、星期四、星期五、星期六、星期日。",
        "1 x 1 = 1, 1 x 2 = 2, 1 x 3 = 3, 1 x 4 = 4, 1 x 5 = 5, 1 x 6 = 6",
        "Give 240 mg of valmorex every 8 hours. Give 240 mg of valmorex every 8 hours.",
        "Yes.",
    ]
    assert [quarantine_reason(text, {}) for text in fine] == [None] * len(fine)
    assert quarantine_reason("GiveGiveGiveGiveGiveGiveGiveGive", {})[0] == "degenerate_answer"


def test_a_conversation_already_ingested_is_a_duplicate_not_a_new_row():
    first, _, _ = judge([answer(1, "Blue light scatters most.", "Why is the sky blue?")], "a", set())
    again = judge([answer(1, "Blue light scatters most.", "Why is the sky blue?")], "a", {first[0]["sample_id"]})
    assert again[0] == [] and again[1] == [] and again[2] == 1


def test_a_base_model_with_no_usable_answer_is_refused_with_the_reasons():
    from tasks.rehearse import refuse_unusable

    stats = source_stats(
        accepted=0, rows_read=180, quarantined_by_reason={"empty_answer": 170, "degenerate_answer": 10}
    )
    with pytest.raises(IngestError, match=r"none of the base model's 180 answers is usable \(empty_answer 170, degen"):
        refuse_unusable(stats.model_copy(update={"file": "answers.jsonl"}))
    refuse_unusable(stats.model_copy(update={"accepted": 1, "file": "answers.jsonl"}))


ENGLISH_DATA = {"general": source_stats("general", scripts={"LATIN": 0.97, "CJK": 0.03}), "p": source_stats("pretrain")}


def test_self_rehearsal_skips_prompts_in_a_script_the_data_does_not_use(tmp_path):
    config = tiny_config(tmp_path, data={"sources": DOMAIN_ONLY, "rehearsal": "self"})
    asked = asked_prompts(config, ENGLISH_DATA)  # 3% CJK is a quote or a name, not a language of the data
    assert len(asked) == 90 and {script_of(p) for p in asked} == {"LATIN"}
    assert planned_sizes(config, ENGLISH_DATA)[LABEL].train == 90 - round(0.25 * 90)
    chinese = {"d": source_stats("domain", scripts={"CJK": 1.0})}
    assert {script_of(p) for p in asked_prompts(config, chinese)} == {"CJK"}
    with pytest.raises(IngestError, match=r"no prompt is written in the scripts of the run's data \(CYRILLIC\)"):
        asked_prompts(config, {"d": source_stats("domain", scripts={"CYRILLIC": 1.0})})


def test_an_answer_in_another_script_than_its_prompt_is_quarantined():
    answers = [
        answer(1, "17乘以23等于23 * 2 = 66", "What is 17 times 23?"),
        answer(2, "17 times 23 is 391.", "What is 17 times 23?"),
        answer(3, "天空是蓝色的，因为蓝光散射得最多。", "为什么天空是蓝色的？"),
        answer(4, "391", "17 * 23 = ?"),  # no letters on either side: nothing to compare
        answer(5, "Blue light scatters most, 所以天空是蓝色的 in English: Rayleigh.", "Why is the sky blue?"),
    ]
    accepted, quarantined, _ = judge(answers, "answers.jsonl", set())
    assert [r["line"] for r in accepted] == [2, 3, 4, 5]
    [wrong] = quarantined
    assert (wrong["line"], wrong["reason"]) == (1, "other_script")
    assert "written in CJK, its prompt in LATIN" in wrong["message"]


def test_a_held_out_split_too_small_to_judge_drift_on_is_refused():
    stats = source_stats(val=MIN_HELD_OUT - 1, accepted=60)
    with pytest.raises(IngestError, match=rf"15 of 60 accepted answers held out, fewer than {MIN_HELD_OUT}: too few"):
        refuse_too_few_held_out(stats)
    refuse_too_few_held_out(stats.model_copy(update={"val": MIN_HELD_OUT}))


def test_the_validation_split_is_seeded_and_follows_val_fraction():
    rows = [answer(i, f"answer number {i} says something different") for i in range(1, 41)]
    settings = SelfRehearsal(val_fraction=0.2, max_val_samples=5)
    draws = []
    for _ in range(2):
        accepted, _, _ = judge(rows, "a", set())
        split(accepted, 7, settings)
        draws.append({r["line"] for r in accepted if r["split"] == "val"})
    assert draws[0] == draws[1] and len(draws[0]) == 5  # 20% of 40 is 8, capped at max_val_samples


def test_the_bundled_prompts_are_many_distinct_and_in_english_and_chinese():
    prompts = read_prompts(BUNDLED_PROMPTS, 10_000)
    assert len(prompts) >= 150 and len(set(prompts)) == len(prompts)
    scripts = script_mix(prompts)
    assert scripts["LATIN"] > 0.25 and scripts["CJK"] > 0.25, scripts
    assert {"LATIN", "CJK"} <= set(script_mix(read_prompts(BUNDLED_PROMPTS, 2)))  # the first few hold both


def test_a_prompts_file_is_text_lines_or_jsonl_and_a_bad_row_names_its_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("What is rain?\n\n下雨是什么？\nA third\n", encoding="utf-8")
    assert read_prompts(text, 2) == ["What is rain?", "下雨是什么？"]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "one"}\n{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(Exception, match=r"p.jsonl: line 2: expected a JSON object with a non-empty 'prompt'"):
        read_prompts(rows, 10)


def test_a_domain_only_config_is_accepted_with_rehearsal_self_only(tmp_path):
    from mixtune.core.config import validate_config

    config = tiny_config(tmp_path, data={"sources": DOMAIN_ONLY, "rehearsal": "self"})
    both = {"d": source_stats("domain", scripts={"LATIN": 0.6, "CJK": 0.4})}
    planned = planned_sizes(config, both)[LABEL]
    assert (planned.role, planned.train) == ("general", 180 - 45)  # every prompt, less val
    with pytest.raises(ConfigError, match="needs at least one source with role general"):
        validate_config(tiny_raw_config(tmp_path, data={"sources": DOMAIN_ONLY}), "test config", tmp_path)
    with pytest.raises(ConfigError, match="data.rehearsal: Input should be 'none' or 'self'"):
        validate_config(tiny_raw_config(tmp_path, data={"sources": DOMAIN_ONLY, "rehearsal": "yes"}), "c", tmp_path)
    missing = {"sources": DOMAIN_ONLY, "rehearsal": "self", "self_rehearsal": {"prompts": "nowhere.txt"}}
    with pytest.raises(ConfigError, match="data.self_rehearsal.prompts: file not found"):
        validate_config(tiny_raw_config(tmp_path, data=missing), "test config", tmp_path)


def test_answers_are_generated_once_per_model_and_prompts(tmp_path, monkeypatch):
    """Real greedy generation on a tiny model; a second call with the same model and prompts reads the cache."""
    calls = []
    real = own_answers_module.answer_probes
    monkeypatch.setattr(own_answers_module, "answer_probes", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    base = str(tiny_hf_model(tmp_path / "base"))
    prompts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    prompts[0].write_text("What is rain?\nName a colour.\n天空为什么是蓝色的？\n", encoding="utf-8")
    prompts[1].write_text("What is snow?\nName a fruit.\n", encoding="utf-8")

    def run(path: Path):
        settings = {"prompts": str(path), "max_new_tokens": 6, "batch_size": 2}
        config = tiny_config(tmp_path, data={"sources": DOMAIN_ONLY, "rehearsal": "self", "self_rehearsal": settings})
        return rehearse(config, ingest(config), base).stats[LABEL]

    first, again, other = run(prompts[0]), run(prompts[0]), run(prompts[1])
    # the repeat generated nothing; the Chinese prompt is not asked: the (synthetic) data is English
    assert [len(asked) for asked in calls] == [2, 2]
    assert first == again and other.rows_read == 2
    for stats in (first, other):
        assert stats.accepted + stats.duplicates + stats.quarantined == stats.rows_read


# A tiny model pre-trained for seconds answers every prompt with newlines (quarantined, all of them, as
# empty_answer), so the end-to-end run scripts the base model's answers; generation itself is exercised above.
def scripted_answers(model_dir, base_dir, asked, batch_size, time_bound_s=None, max_new_tokens=0, label=""):
    texts = [f"A short answer about: {a['prompt'][-1]['content']}" for a in asked]
    texts[1], texts[2], texts[3] = "", "again and " * 10, texts[0]  # empty, degenerate, duplicate
    return [{**a, "answer": text, "cut": False, "ended": True} for a, text in zip(asked, texts)]


@pytest.mark.e2e
def test_the_flow_runs_on_domain_data_alone_with_the_base_models_answers_as_general_data(
    prefect_harness, tmp_path, monkeypatch
):
    from flows.finetune import finetune

    monkeypatch.setattr(own_answers_module, "answer_probes", scripted_answers)
    config = tiny_config(
        tmp_path,
        data={
            "sources": DOMAIN_ONLY,
            "rehearsal": "self",
            "self_rehearsal": {"max_prompts": 40, "max_new_tokens": 16, "val_fraction": 0.5},
        },
        schedule={"stages": 2, "samples_per_stage": 64},
        validation={"forgetting_budget": 10.0},
    )
    summary = finetune(config)

    reports = Path(config.run.output_dir).rglob("data_report.json")
    [report_file] = [path for path in reports if (path.parent / "sft.parquet").is_file()]  # not MLflow's copy
    report = {row["source"]: row for row in json.loads(report_file.read_text())}
    row = report[LABEL]
    assert row["role"] == "general" and row["rows_read"] == 40
    assert row["quarantined_by_reason"] == {"empty_answer": 1, "degenerate_answer": 1, "duplicate_answer": 1}
    assert row["accepted"] + row["duplicates"] + row["quarantined"] == 40
    assert row["val"] == round(0.5 * row["accepted"]) and row["train"] == row["accepted"] - row["val"]
    assert LABEL in (report_file.parent / "data_report.md").read_text()

    # The general validation set is the rehearsal's held-out answers: base and stages are measured on it.
    held_out = [("split", "==", "val"), ("tag", "==", "general")]
    val = pd.read_parquet(report_file.parent / "sft.parquet", filters=held_out)
    assert set(val["source"]) == {LABEL} and len(val) == row["val"]
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id).data
    assert parent.metrics["base_general_val_loss"] == pytest.approx(summary.baseline.general)
    assert parent.metrics["rehearsal_accepted"] == row["accepted"]
    assert parent.metrics["rehearsal_quarantined/degenerate_answer"] == 1
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id, "data/rehearsal")}
    assert artifacts == {"data/rehearsal/conversations.jsonl", "data/rehearsal/answers.jsonl"}
    assert len(summary.stages) == 2
    for stage in summary.stages:
        drift = stage.losses.general / summary.baseline.general - 1
        assert stage.gate.general_drift == pytest.approx(drift)
        assert client.get_run(stage.run_id).data.metrics["general_drift"] == pytest.approx(drift)
        assert stage.source_epochs[LABEL] > 0  # the stage trained on the rehearsal rows
