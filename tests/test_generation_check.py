"""The generation check: a stage's answers to fixed general prompts against the base model's."""

import pytest

import tasks.generation_check as check
from tests.conftest import tiny_config
from tests.records import source_stats

ENGLISH = {"general": source_stats("general", scripts={"LATIN": 1.0})}
TIPS = "1. Sleep eight hours.\n2. Eat vegetables every day.\n3. Walk for thirty minutes after dinner."


def said(text: str, ended: bool = True) -> dict:
    return {"prompt": "p", "answer": text, "ended": ended}


def test_answers_that_stop_early_loop_or_lose_their_list_are_counted_and_flagged():
    base = [said(TIPS)] * 3
    metrics = check.compare(base, [said("Sleep."), said(TIPS), said("sleep more " * 20, ended=False)])
    assert metrics["gen/stopped_early"] == pytest.approx(1 / 3)  # the loop ran to the bound: not an early stop
    assert metrics["gen/looped"] == pytest.approx(1 / 3)
    assert metrics["gen/format_kept"] == pytest.approx(1 / 3)
    assert metrics["gen/length_ratio"] == pytest.approx((6 + len(TIPS) + 220) / (3 * len(TIPS)))
    flags = check.generation_flags(metrics)
    assert flags == [
        "33% of the general answers stop early",
        "33% of the general answers loop",
        "only 33% of the general answers keep the base's format",
    ]
    assert check.generation_flags(check.compare(base, base)) == []
    looping = [said("sleep more " * 20, ended=False)] * 3  # a base that loops: its stage's loops are no change
    assert check.compare(looping, looping)["gen/looped"] == 0.0


def test_the_prompts_are_the_bundled_ones_in_the_datas_scripts():
    english = check.general_prompts(ENGLISH, 6)
    assert len(english) == 6 and all(p.isascii() for p in english)
    chinese = check.general_prompts({"d": source_stats("domain", scripts={"CJK": 1.0})}, 4)
    assert len(chinese) == 4 and not any(p.isascii() for p in chinese)


def test_a_stub_model_whose_answers_stop_early_is_flagged_and_the_base_is_answered_once(tmp_path, monkeypatch):
    calls = []

    def stub(model_dir, base_dir, asked, batch_size, time_bound_s=None, max_new_tokens=0):
        calls.append((model_dir, len(asked), max_new_tokens))
        text = TIPS if model_dir.endswith("base") else "Sleep."  # the stage model ends its turn after a word
        return [{**a, "answer": text, "cut": False, "ended": True} for a in asked]

    monkeypatch.setattr(check, "answer_probes", stub)
    config = tiny_config(tmp_path, validation={"generation_prompts": 4, "generation_tokens": 32})
    (tmp_path / "base").mkdir()
    stage = tmp_path / "stage"
    stage.mkdir()
    metrics = check.generation_check(config, str(stage), str(tmp_path / "base"), ENGLISH, str(stage))
    assert metrics["gen/stopped_early"] == 1.0 and metrics["gen/length_ratio"] == pytest.approx(6 / len(TIPS))
    assert check.generation_flags(metrics)[0] == "100% of the general answers stop early"
    assert "- stage: Sleep." in (stage / "general_answers.md").read_text()
    check.generation_check(config, str(stage), str(tmp_path / "base"), ENGLISH, str(stage))
    assert [c[0].rsplit("/", 1)[-1] for c in calls] == ["base", "stage", "stage"]  # the base's answers: cached
    assert {c[1:] for c in calls} == {(4, 32)}


def test_the_check_is_off_with_no_prompts(tmp_path):
    config = tiny_config(tmp_path, validation={"generation_prompts": 0})
    assert check.generation_check(config, "stage", "base", ENGLISH, str(tmp_path)) == {}


def test_the_run_summary_names_a_stage_whose_answers_stop_early_and_where_drift_was_measured(tmp_path, monkeypatch):
    from mixtune import cli
    from tasks.records import RunSummary, TokenLosses
    from tests.conftest import finished_stage_report

    losses = TokenLosses(domain=2.0, general=1.0, general_eval=1.5)
    said = {"gen/length_ratio": 0.2, "gen/stopped_early": 0.5, "gen/looped": 0.0, "gen/format_kept": 1.0}
    stage = finished_stage_report(tmp_path, losses, said)
    summary = RunSummary(
        parent_run_id="p", tracking_uri="sqlite://", experiment="mixtune", baseline=losses, stages=[stage]
    )
    monkeypatch.setattr(cli, "open_ui_lines", lambda uri, experiment: [])
    text = cli.format_summary(summary, 1.0)
    assert "stage 1 generation check: 50% of the general answers stop early" in text
    assert "gen/stopped_early" in text.splitlines()[1]  # a column of the stage table
    assert "drift: on the general_eval source(s), never trained on (base loss 1.5000)" in text
