"""`mixtune` command line. The config is loaded and checked before Prefect, MLflow or torch are imported,
so a bad value fails in about a second, naming the file and the field."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mixtune.config import ConfigError, PipelineConfig, load_config

DEFAULT_CONFIG = "pipeline.yaml"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mixtune",
        description="Fine-tune small causal LMs the MiniMind way: domain data mixed into general data on a "
                    "rising schedule, full SFT or LoRA, validation on domain and general sets after every stage.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the finetune flow locally (ephemeral Prefect, MLflow tracking)",
                              description="Run the whole pipeline: ingest, pre-train (scratch models), then "
                                          "mix / train / validate / gate per stage. Prints a per-stage table.")
    check = commands.add_parser("check", help="validate a config and its input files, print the stage plan",
                                description="Check the config and that every input exists; no training.")
    advise = commands.add_parser(
        "advise", help="ingest the data and recommend method, epochs and schedule, with the rule behind each",
        description="Ingest (cached) and print MiniMind's fine-tuning rules applied to your data: method, epochs, staged "
                    "schedule, continued pre-training, and how often each source would be seen per stage. "
                    "With `plan: auto` in the config, `mixtune run` uses exactly this advice.")
    for sub in (run, check, advise):
        sub.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="pipeline YAML (default: %(default)s)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one field, e.g. --set train.learning_rate=1e-4 (repeatable)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"mixtune: invalid config\n{err}", file=sys.stderr)
        return 2
    if args.command == "check":
        return check(config)
    if args.command == "advise":
        return advise(config)
    return run(config)


def check(config: PipelineConfig) -> int:
    from tasks.mix import stage_shares

    shares = ", ".join(f"{s:.3f}" for s in stage_shares(config.schedule))
    print(f"config OK: {len(config.data.sources)} source(s), method {config.train.method}, "
          f"domain share per stage: {shares}")
    return 0


def advise(config: PipelineConfig) -> int:
    from tasks.ingest import IngestError, ingest
    from tasks.plan import make_plan

    try:
        data = ingest(config)
    except IngestError as err:
        print(f"mixtune: {err}", file=sys.stderr)
        return 2
    for label, s in data.stats.items():
        print(f"{label}: {s['role']}, {s['accepted']:,} accepted ({s['train']:,} train / {s['val']:,} val), "
              f"{s['duplicates']:,} duplicate, {s['quarantined']:,} quarantined")
    print()
    print(make_plan(config, data.stats).text)
    return 0


def run(config: PipelineConfig) -> int:
    from flows.finetune import finetune

    from tasks.ingest import IngestError

    logging.getLogger("mixtune").setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        summary = finetune(config)
    except IngestError as err:
        print(f"mixtune: unusable input, nothing was trained:\n  {err}", file=sys.stderr)
        return 2
    print(format_summary(summary, time.perf_counter() - started))
    return 0


def format_summary(summary, seconds: float) -> str:
    headers = ["stage", "target", "realised", "domain val", "general val", "drift", "steps", "decision"]
    rows = [["base", "", "", f"{summary.baseline.domain:.4f}", f"{summary.baseline.general:.4f}", "", "", ""]]
    for r in summary.stages:
        rows.append([str(r.stage), f"{r.target_share:.3f}", f"{r.realised_share:.3f}", f"{r.losses.domain:.4f}",
                     f"{r.losses.general:.4f}", f"{r.gate.general_drift:+.1%}",
                     f"{r.steps}{'*' if r.stopped_early else ''}", r.gate.decision])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = ["", line(headers), line(["-" * w for w in widths]), *map(line, rows), ""]
    for r in summary.stages:
        if r.stopped_early:
            out.append(f"* stage {r.stage} stopped early: {r.stop_reason}; best checkpoint (step {r.best_step}) kept")
    if summary.stopped_reason:
        out.append(f"run stopped: {summary.stopped_reason}")
    if summary.final_stage == 0:
        out.append(f"final model: the base model, {summary.final_model} (no stage passed the gate)")
    else:
        out.append(f"final model: {summary.final_model} (stage {summary.final_stage})")
    out.append(f"wall time: {seconds:.0f} s")
    out.append(f"MLflow run {summary.parent_run_id}; open the UI with:")
    out.append(f"  {mlflow_command()} ui --backend-store-uri {summary.tracking_uri} --workers 1")
    return "\n".join(out)


def mlflow_command() -> str:
    """The mlflow next to this interpreter (a venv's), so the printed command works without activating it."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"


if __name__ == "__main__":
    sys.exit(main())
