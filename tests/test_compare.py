"""`mixtune compare` on runs as MLflow's search returns them: what differs between runs is shown, and no two rows
or legend entries share a name."""

import pandas as pd

from mixtune import compare
from mixtune.compare import comparison, distinct_names, format_table, trade_off_plot

IDS = ["aa11" * 8, "bb22" * 8, "cc33" * 8]


def searched_runs(names: list[str], **params: list) -> pd.DataFrame:
    """Parent runs as `pipeline_runs` gives them: tags, the shown metrics, and flattened config params."""
    count = len(names)
    runs = pd.DataFrame({"run_id": IDS[:count], "tags.mlflow.runName": names, "status": ["FINISHED"] * count})
    for column in ("tags.mixtune.method", "tags.mixtune.schedule", "tags.mixtune.verdict"):
        runs[column] = "full"
    runs["metrics.base_domain_val_loss"] = 4.0
    runs["metrics.base_general_val_loss"] = 2.0
    runs["metrics.final_domain_val_loss"] = [3.0, 2.0, 1.0][:count]
    runs["metrics.final_general_val_loss"] = [2.0, 2.1, 2.2][:count]
    runs["metrics.tokens_per_second"] = 1000.0
    for field, values in params.items():
        runs[f"params.{field.replace('__', '.')}"] = values
    return runs


def test_compare_shows_the_learning_rate_and_every_config_field_that_differs():
    runs = searched_runs(
        ["default", "lora", "older"],
        train__learning_rate=["None", "0.005", "0.002"],
        plan__learning_rate=["0.001", "0.005", None],  # a run logged before the plan named its rate
        train__lora__r=["16", "8", "16"],
        validation__patience=["3", "3", "3"],
        run__name=["default", "lora", "older"],
        schedule__shares=["None", "[1.0]", "None"],
    )
    table = comparison(runs, set())
    assert list(table["learning rate"]) == ["0.001", "0.005", "0.002"]
    assert list(table["train.lora.r"]) == ["16", "8", "16"]
    for same_or_shown in ("validation.patience", "run.name", "schedule.shares", "train.learning_rate"):
        assert same_or_shown not in table
    header = format_table(table).splitlines()[0]
    assert "learning rate" in header and "train.lora.r" in header


def test_runs_without_a_rate_or_params_show_a_dash():
    assert list(comparison(searched_runs(["a", "b"]), set())["learning rate"]) == ["-", "-"]


def test_no_two_rows_share_a_name_even_when_a_run_is_named_like_another_runs_label():
    names = ["x", "x", f"x ({IDS[0][:8]})", f"x ({IDS[0]})"]
    labels = distinct_names(names, [IDS[0], IDS[1], IDS[2], "dd44" * 8])
    assert len(set(labels)) == 4
    assert labels[:2] == [f"x ({IDS[0]})", f"x ({IDS[1]})"] and labels[3] == f"x ({IDS[0]}) #2"


def test_the_plot_has_one_legend_entry_per_run_with_its_rate(tmp_path, monkeypatch):
    legends = []
    monkeypatch.setattr(compare, "save", lambda fig, path: legends.append(fig.axes[0].get_legend()) or path)
    runs = searched_runs(["same", "same", "other"], plan__learning_rate=["0.001", "0.001", "0.005"])
    table = comparison(runs, set())
    trade_off_plot(table, {}, 0.1, tmp_path / "compare.png", "title")
    entries = [text.get_text() for text in legends[0].get_texts()]
    assert len(entries) == len(set(entries)) == 4  # three runs and the budget line
    assert f"same ({IDS[0][:8]}) (full, lr 0.001)" in entries and "other (full, lr 0.005)" in entries
