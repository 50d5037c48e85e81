"""`mixtune compare`: the runs of an experiment side by side, and the learning-forgetting trade-off as a plot.

Everything comes from one MLflow run search: the parent runs carry the same tags and metrics whatever their
method, so this table, MLflow's own compare view and a notebook all line up."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks import tracking
from tasks.mlflow_names import FINAL, TASK, Metric, MlflowTag, Tag
from tasks.plots import plt, save  # tasks.plots selects the Agg backend before pyplot loads

COLUMNS = {
    f"tags.{MlflowTag.RUN_NAME}": "run",
    "status": "status",
    f"tags.{Tag.METHOD}": "method",
    f"tags.{Tag.SCHEDULE}": "schedule",
    f"metrics.{Metric.FINAL_DOMAIN_VAL_LOSS}": "domain val",
    f"metrics.{Metric.FINAL_GENERAL_VAL_LOSS}": "general val",
    f"metrics.{Metric.TOKENS_PER_SECOND}": "tokens/s",
    f"tags.{Tag.VERDICT}": "decision",
}
BASE_DOMAIN, BASE_GENERAL = f"metrics.{Metric.BASE_DOMAIN_VAL_LOSS}", f"metrics.{Metric.BASE_GENERAL_VAL_LOSS}"
REGISTERED_MODEL = f"tags.{Tag.REGISTERED_MODEL}"
FINAL_TASK = f"metrics.{FINAL}{TASK}"
# The rate a run trained at: the plan's (chosen by model when the config leaves it unset), else the config's.
RATE_PARAMS = ("params.plan.learning_rate", "params.train.learning_rate")
# Config params the table shows already (run, method, schedule) or that say where a run logged, not what it did.
SHOWN_PARAMS = ("run.", "train.method", "schedule.", "plan.method", "plan.shares", "tracking.", "deploy.")


def pipeline_runs(uri: str, experiment: str) -> pd.DataFrame:
    """mlflow.search_runs' table (run_id, status, metrics.*, params.*, tags.*), read through a client: the
    fluent call would set the process-wide tracking URI (and MLFLOW_TRACKING_URI) as a side effect."""
    runs = pd.DataFrame(
        [
            {
                "run_id": r.info.run_id,
                "status": r.info.status,
                "start_time": r.info.start_time,
                **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
                **{f"params.{k}": v for k, v in r.data.params.items()},
                **{f"tags.{k}": v for k, v in r.data.tags.items()},
            }
            for r in tracking.pipeline_runs(uri, experiment)
        ]
    )
    for column in [
        *COLUMNS,
        BASE_DOMAIN,
        BASE_GENERAL,
        REGISTERED_MODEL,
        "params.validation.forgetting_budget",
    ]:
        if column not in runs:
            runs[column] = None
    return runs


def champion_runs(uri: str, runs: pd.DataFrame, alias: str) -> set[str]:
    names = runs[REGISTERED_MODEL].dropna().unique()
    return {run_id for name in names if (run_id := tracking.alias_run_id(uri, name, alias))}


def comparison(runs: pd.DataFrame, champions: set[str]) -> pd.DataFrame:
    """One row per pipeline run: what it trained, where it ended, and how far it moved from its base model."""
    table = runs[list(COLUMNS)].rename(columns=COLUMNS)
    table["run"] = distinct_names(table["run"].fillna("-").astype(str).tolist(), runs["run_id"].tolist())
    domain_base = pd.to_numeric(runs[BASE_DOMAIN], errors="coerce")
    general_base = pd.to_numeric(runs[BASE_GENERAL], errors="coerce")
    table["domain gain"] = (domain_base - table["domain val"]) / domain_base
    table["general drift"] = (table["general val"] - general_base) / general_base
    for column in sorted(c for c in runs if c.startswith(FINAL_TASK)):  # only runs with an eval
        table[column.removeprefix(FINAL_TASK)] = pd.to_numeric(runs[column], errors="coerce")
    table["learning rate"] = learning_rates(runs)
    for param, values in differing_params(runs).items():
        table[param] = values
    table["champion"] = ["*" if run_id in champions else "" for run_id in runs["run_id"]]
    table["run_id"] = runs["run_id"]
    return table.reset_index(drop=True)


def learning_rates(runs: pd.DataFrame) -> list[str]:
    rates = []
    for _, run in runs.iterrows():
        given = [run[p] for p in RATE_PARAMS if p in run and pd.notna(run[p]) and run[p] != "None"]
        rates.append(f"{float(given[0]):g}" if given else "-")
    return rates


def differing_params(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Every config field (a flattened param) whose value is not the same in all runs, by its field path: what
    else the runs were told to do differently."""
    differing = {}
    for column in sorted(c for c in runs if c.startswith("params.")):
        field = column.removeprefix("params.")
        if column in RATE_PARAMS or field.startswith(SHOWN_PARAMS):
            continue
        values = runs[column].fillna("-").astype(str).tolist()
        if len(set(values)) > 1:
            differing[field] = values
    return differing


def distinct_names(names: list[str], run_ids: list[str]) -> list[str]:
    """One label per row and plot entry: a name two runs share (named before names were unique) gets the
    start of each run's MLflow id, or the whole id if the start is shared too."""
    for digits in (8, 32):
        labels = [f"{n} ({r[:digits]})" if names.count(n) > 1 else n for n, r in zip(names, run_ids)]
        if len(set(labels)) == len(labels):
            return labels
    # A run named like another's label ("a (<its id>)"): a count after a label already taken.
    taken: set[str] = set()
    for i, label in enumerate(labels):
        count = 1
        while labels[i] in taken:
            count += 1
            labels[i] = f"{label} #{count}"
        taken.add(labels[i])
    return labels


def stage_paths(uri: str, runs: pd.DataFrame) -> dict[str, list[tuple[float, float]]]:
    """Per run, (general drift, domain gain) after each stage: where a run went, not only where it ended; a
    stage the gate refused (past the forgetting budget) shows here though the run's final model is earlier."""
    paths = {}
    domain, general = Metric.STAGE_DOMAIN_VAL_LOSS, Metric.STAGE_GENERAL_VAL_LOSS
    for _, run in runs.dropna(subset=[BASE_DOMAIN, BASE_GENERAL]).iterrows():
        curves = tracking.metric_curves(uri, run["run_id"], [domain, general])
        history = {name: dict(points) for name, points in curves.items()}
        domain_base, general_base = run[BASE_DOMAIN], run[BASE_GENERAL]
        paths[run["run_id"]] = [(0.0, 0.0)] + [
            (
                (history[general][step] - general_base) / general_base,
                (domain_base - loss) / domain_base,
            )
            for step, loss in sorted(history[domain].items())
            if step in history[general]
        ]
    return paths


def format_table(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["run_id"]).copy()
    for column, fmt in (
        ("domain val", "{:.4f}"),
        ("general val", "{:.4f}"),
        ("domain gain", "{:+.1%}"),
        ("general drift", "{:+.1%}"),
        ("tokens/s", "{:,.0f}"),
        *((column, "{:.3f}") for column in shown if column.endswith(("/exact_match", "/choice"))),
    ):
        shown[column] = [fmt.format(v) if pd.notna(v) else "-" for v in pd.to_numeric(shown[column], errors="coerce")]
    return shown.fillna("-").to_string(index=False)


def trade_off_plot(
    table: pd.DataFrame, paths: dict[str, list[tuple[float, float]]], budget: float | None, path: Path, title: str
) -> Path | None:
    """x: general drift (forgetting), y: domain gain (learning); up and to the left is better. Big markers:
    each run's final model; thin lines: its stages, from the base model at (0, 0)."""
    points = table.dropna(subset=["domain gain", "general drift"])
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colours = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")
    markers = {method: "os^Dv"[i % 5] for i, method in enumerate(sorted(points["method"].astype(str).unique()))}
    for i, (_, row) in enumerate(points.iterrows()):  # a colour per run, a marker per method
        colour = colours(i % colours.N)
        xs, ys = zip(*paths.get(row["run_id"], [(0.0, 0.0)]))
        ax.plot([x * 100 for x in xs], [y * 100 for y in ys], color=colour, linewidth=0.8, marker=".", alpha=0.6)
        ax.scatter(
            row["general drift"] * 100,
            row["domain gain"] * 100,
            s=70,
            color=colour,
            marker=markers[str(row["method"])],
            label=f"{row['run']} ({row['method']}, lr {row['learning rate']})",
        )
    stacked: dict[tuple[float, float], int] = {}  # runs that end at one point get their labels stacked
    for _, row in points.iterrows():
        mark = " (champion)" if row["champion"] else ""
        where = (row["general drift"] * 100, row["domain gain"] * 100)
        key = (round(where[0], 1), round(where[1], 1))
        stacked[key] = stacked.get(key, -1) + 1
        ax.annotate(
            f"{row['run']}{mark}", where, textcoords="offset points", xytext=(6, 4 - 10 * stacked[key]), fontsize=8
        )
    if budget is not None:
        ax.axvline(budget * 100, color="red", linestyle="--", linewidth=1, label=f"forgetting budget {budget:.0%}")
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("general drift: general val loss vs the base model (%)")
    ax.set_ylabel("domain gain: domain val loss drop vs the base model (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save(fig, path)


def compare(uri: str, experiment: str, out: Path, alias: str = "champion") -> tuple[str, Path | None]:
    """The table as text and the plot's path; no runs: (None, None)."""
    runs = pipeline_runs(uri, experiment)
    if runs.empty:
        return None, None
    table = comparison(runs, champion_runs(uri, runs, alias))
    budgets = pd.to_numeric(runs["params.validation.forgetting_budget"], errors="coerce").dropna()
    plot = trade_off_plot(
        table,
        stage_paths(uri, runs),
        budgets.iloc[-1] if len(budgets) else None,
        out,
        f"{experiment}: learning vs forgetting ({table['domain gain'].notna().sum()} runs that trained)",
    )
    return format_table(table), plot
