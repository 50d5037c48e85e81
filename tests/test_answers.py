"""Answer extraction for task metrics: numbers (grouping commas, decimals, negatives, full-width digits) and
choice letters (brackets, answer markers, Chinese punctuation, full-width letters)."""

import pytest

from mixtune.core.config import ConfigError
from tasks.answers import choice_letter, correct, final_number
from tasks.mlflow_names import Metric, Tag
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    "text, number",
    [
        ("Natalia sold 48 clips in April and 24 in May.\n#### 72", "72"),
        ("so the total is $1,234.50 dollars\n#### 1,234.50", "1234.5"),
        ("The change is -17 degrees.", "-17"),
        ("first 3, then 4, so 7", "7"),  # no marker: the last number; "3, 4" is two numbers
        ("#### 5 apples (from 2 baskets)", "5"),  # after the marker: the first number
        ("答案：１２３", "123"),  # full-width digits
        ("温度是−3.0度", "-3"),  # U+2212 minus, trailing zero
        ("100", "100"),
        ("0.50", "0.5"),
        ("no number here", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


@pytest.mark.parametrize(
    "text, letter",
    [
        ("(B)", "B"),
        ("The answer is (C) because ...", "C"),
        ("Answer: D", "D"),
        ("答案：C", "C"),
        ("答案是Ａ。", "A"),  # full-width letter, Chinese full stop
        ("选B，因为……", "B"),
        ("（D）正确", "D"),  # full-width brackets
        ("A. Paris", "A"),
        ("C、北京", "C"),
        ("B", "B"),
        ("Bad weather all day", None),  # a word, not a letter
        ("The answer is a number", None),  # an article, not a choice
        ("I am not sure", None),
    ],
)
def test_choice_letter(text, letter):
    assert choice_letter(text) == letter


def test_correct_compares_final_answers_not_text():
    assert correct("exact_match", "She has 1,200 now.", "... #### 1200")
    assert not correct("exact_match", "She has 1,201 now.", "... #### 1200")
    assert not correct("exact_match", "I don't know", "#### 3")
    assert correct("exact_match", "Paris.", "paris")  # no number in the reference: the text, loosely
    assert correct("choice", "答案：（B）", "B")
    assert not correct("choice", "hmm", "B")
    assert not correct("choice", "B", "no letter")


def test_task_metrics_show_in_the_stage_table_and_in_compare_only_when_present(tmp_path, monkeypatch):
    import pandas as pd

    from mixtune import cli
    from mixtune.cli import format_summary
    from mixtune.compare import comparison, format_table
    from tasks.records import RunSummary, TokenLosses
    from tests.conftest import finished_stage_report

    losses = TokenLosses(domain=2.0, general=1.0)
    stage = finished_stage_report(tmp_path, losses, {"task/gsm/exact_match": 0.25})
    summary = RunSummary(
        parent_run_id="p",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="mixtune",
        baseline=losses,
        baseline_tasks={"task/gsm/exact_match": 0.125},
        stages=[stage],
        final_model=str(tmp_path),
        final_stage=1,
    )
    monkeypatch.setattr(cli, "open_ui_lines", lambda uri, experiment: [])  # no MLflow here
    header, _, base, first = format_summary(summary, 1.0).splitlines()[1:5]
    assert header.split()[-1] == "gsm/exact_match" and base.split()[-1] == "0.125" and first.split()[-1] == "0.250"
    plain = format_summary(summary.model_copy(update={"baseline_tasks": {}, "stages": []}), 1.0)
    assert "exact_match" not in plain

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "tags.mlflow.runName": ["with", "without"],
            "metrics.base_domain_val_loss": [2.0, 2.0],
            "metrics.base_general_val_loss": [1.0, 1.0],
            "metrics.final_task/gsm/exact_match": [0.25, None],
        }
    )
    for column in ("status", f"tags.{Tag.METHOD}", f"tags.{Tag.SCHEDULE}", f"tags.{Tag.VERDICT}"):
        runs[column] = "-"
    for metric in (Metric.FINAL_DOMAIN_VAL_LOSS, Metric.FINAL_GENERAL_VAL_LOSS, Metric.TOKENS_PER_SECOND):
        runs[f"metrics.{metric}"] = 1.0
    table = format_table(comparison(runs, set()))
    assert "gsm/exact_match" in table.splitlines()[0] and "0.250" in table


def test_a_bad_eval_is_refused_naming_its_field(tmp_path):
    sources = [
        {"synthetic": "general", "role": "general", "eval": {"metric": "choice"}},
        {"synthetic": "domain", "role": "domain", "eval": {"metric": "exact_match", "max_samples": 0}},
        {"path": "text.txt", "role": "pretrain", "eval": {"metric": "exact_match"}},
    ]
    with pytest.raises(ConfigError) as refused:
        tiny_config(tmp_path, data={"sources": sources})
    assert "data.sources.1.eval.max_samples" in str(refused.value)
    assert "data.sources.2: Value error, eval scores answers to conversations" in str(refused.value)
