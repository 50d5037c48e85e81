"""`mixtune` command line. The config is loaded and checked before Prefect, MLflow or torch are imported,
so a bad value fails in about a second, naming the file and the field."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mixtune.core.config import ConfigError, PipelineConfig, load_config

if TYPE_CHECKING:  # the commands import the pipeline only when they run: `mixtune --help` stays quick
    from tasks.records import SourceStats

DEFAULT_CONFIG = "pipeline.yaml"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mixtune",
        description="Fine-tune small causal LMs the MiniMind way: domain data mixed into general data on a "
        "rising schedule, full SFT or LoRA, validation on domain and general sets after every stage.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the finetune flow locally (ephemeral Prefect, MLflow tracking)",
        description="Run the whole pipeline: ingest, pre-train (scratch models), then "
        "mix / train / validate / gate per stage. Prints a per-stage table.",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start over: do not continue an interrupted run of the same inputs (the default continues it)",
    )
    run.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="train each stage on N processes through torchrun (GPUs, or gloo on CPU); same as --set train.devices=N",
    )
    check = commands.add_parser(
        "check",
        help="validate a config and read every input file, print the stage plan",
        description="Check the config, then read every input file (streaming, no tokenising; cached like a run's "
        "ingest) and report per source: layout, detected formats with counts, rows accepted, duplicate and "
        "quarantined by reason. Fails (exit 2) on every input error `run` would hit before training.",
    )
    advise = commands.add_parser(
        "advise",
        help="ingest the data and recommend method, epochs and schedule, with the rule behind each",
        description="Ingest (cached) and print MiniMind's fine-tuning rules applied to your data: method, epochs, "
        "staged schedule, continued pre-training, and how often each source would be seen per stage. "
        "With `plan: auto` in the config, `mixtune run` uses exactly this advice.",
    )
    serve = commands.add_parser(
        "serve",
        help="serve the finetune flow as Prefect deployments (cron from deploy.cron, and manual)",
        description="Register <deploy.name>-manual (and <deploy.name>-scheduled when deploy.cron is set) on the "
        "Prefect server at PREFECT_API_URL and run their flow runs from this process until stopped. "
        "The config becomes the deployments' default parameters: the Prefect UI's form.",
    )
    deploy = commands.add_parser(
        "deploy",
        help="register the deployments on a Prefect work pool, for `prefect worker start` to run",
        description="Like serve, but the flow runs go to a process work pool and any worker on it runs them.",
    )
    deploy.add_argument("--pool", default="mixtune", help="process work pool (created if missing; default %(default)s)")
    compare = commands.add_parser(
        "compare",
        help="table and plot of an experiment's runs: losses, drift, decision, champion",
        description="Print the experiment's pipeline runs (method, schedule, final domain and general val loss, "
        "change vs base, tokens/s, retraining decision, champion) and write a PNG of domain gain "
        "against general drift.",
    )
    compare.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment of the config)")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    compare.add_argument("--out", help="PNG path (default: <output_dir>/compare-<experiment>.png)")
    gc = commands.add_parser(
        "gc",
        help="remove old runs' folders and unused caches of the pipeline; print what it frees",
        description="Remove the folders of the pipeline's (run.name in run.output_dir) older runs, keeping the last "
        "N, the champion's, and any run that is running or that the next start would resume; then cache entries "
        "no kept run has used (by last use, not age). MLflow's records, plots and logged models stay.",
    )
    gc.add_argument("--keep-last", type=int, metavar="N", help="runs to keep (default: run.retention, else 1)")
    gc.add_argument("--dry-run", action="store_true", help="print what would go; delete nothing")
    for sub in (run, check, advise, serve, deploy, compare, gc):
        sub.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="pipeline YAML (default: %(default)s)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one field, e.g. --set train.learning_rate=1e-4 (repeatable)",
        )
    return top


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # databases, caches, quarantined rows and models: readable by their owner only
    args = parser().parse_args(argv)
    try:
        devices = [f"train.devices={args.devices}"] if getattr(args, "devices", None) is not None else []
        config = load_config(args.config, [*args.overrides, *devices])
        credentials_to_environment(config, args.command)
    except ConfigError as err:
        print(f"mixtune: invalid config\n{err}", file=sys.stderr)
        return 2
    if args.command == "check":
        return check(config)
    if args.command == "advise":
        return advise(config)
    if args.command == "compare":
        return compare(config, args)
    if args.command == "gc":
        return collect(config, args)
    from mixtune.core.preflight import Unreachable

    try:
        preflight(config)
    except Unreachable as err:
        print(f"mixtune: {err}", file=sys.stderr)
        return 2
    if args.command in ("serve", "deploy"):
        return deployments(config, args)
    given = any(item.split("=", 1)[0].strip() == "run.name" for item in args.overrides)
    return run(config, args.fresh, config.run.name if given else None)


def credentials_to_environment(config: PipelineConfig, command: str) -> None:
    """user:password in tracking.tracking_uri move to MLflow's own variables before anything runs, so the
    URI that is logged, stored by Prefect as a flow parameter and printed carries none."""
    from mixtune.core.uris import split_credentials

    uri = config.tracking.tracking_uri
    clean, user, password = split_credentials(uri) if uri else (uri, None, None)
    if user is None:
        return
    if command == "deploy":  # the worker runs these flows: the credentials belong in its environment
        raise ConfigError(
            "tracking.tracking_uri: no credentials in a deployed config (Prefect would store them); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the worker's environment"
        )
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    config.tracking.tracking_uri = clean


def preflight(config: PipelineConfig) -> None:
    from mixtune.core.paths import tracking_uri
    from mixtune.core.preflight import check_prefect_api, check_tracking_server

    check_prefect_api()
    check_tracking_server(tracking_uri(config))


def check(config: PipelineConfig) -> int:
    from tasks.ingest import IngestError, ingest, refuse_unusable_inputs
    from tasks.schedule import stage_shares

    shares = ", ".join(f"{s:.3f}" for s in stage_shares(config.schedule))
    if config.schedule.shape == "adaptive":
        shares = f"adaptive, {config.schedule.start:.3f} rising toward at most {config.schedule.end:.3f}"
    print(
        f"config OK: {len(config.data.sources)} source(s), method {config.train.method}, "
        f"domain share per stage: {shares}"
    )
    try:
        data = ingest(config)
        for label, s in data.stats.items():
            print(source_line(label, s))
        refuse_unusable_inputs(config, data.stats)
    except IngestError as err:
        print(unusable_input(err), file=sys.stderr)
        return 2
    print("inputs OK: every file read")
    return 0


def source_line(label: str, s: SourceStats) -> str:
    formats = ", ".join(f"{name} {n:,}" for name, n in s.formats.items()) or "none"
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in s.quarantined_by_reason.items())
    return (
        f"{label}: {s.role}, {s.layout}{', UTF-8 BOM stripped' if s.utf8_bom else ''}; formats {formats}; "
        f"{s.rows_read:,} read, {s.accepted:,} accepted ({s.train:,} train / {s.val:,} val), "
        f"{s.duplicates:,} duplicate, {s.quarantined:,} quarantined" + (f" ({reasons})" if reasons else "")
    )


def advise(config: PipelineConfig) -> int:
    from tasks.ingest import IngestError, ingest
    from tasks.plan import make_plan

    try:
        data = ingest(config)
    except IngestError as err:
        print(f"mixtune: {err}", file=sys.stderr)
        return 2
    for label, s in data.stats.items():
        print(source_line(label, s))
    print()
    print(make_plan(config, data.stats).text)
    from tasks.base_model import disk_need

    print(f"\ndisk: a run of this config needs {disk_need(config).text()}")
    return 0


class Terminated(BaseException):
    """SIGTERM outside a flow run (inside one, Prefect raises its TerminationSignal, ends the flow run Crashed,
    runs its hooks, which end the MLflow runs KILLED, then sends the signal again, which lands here)."""


def terminate(signum, frame) -> None:
    raise Terminated()


def run(config: PipelineConfig, fresh: bool = False, name: str | None = None) -> int:
    """SIGTERM ends the run promptly at any point (between two Python steps, however long the job), exit 143."""
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return run_pipeline(config, fresh, name)
    except Terminated:
        print("mixtune: terminated by SIGTERM; the run's MLflow runs end KILLED", file=sys.stderr, flush=True)
        stop_temporary_prefect_server()
        # Python's exit would now flush Prefect's queued logs and events to the server just stopped, retrying
        # for 15-20 s: a terminated run leaves them (its MLflow runs are ended already, by the flow's hook).
        os._exit(128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_temporary_prefect_server(grace_s: float = 2.0) -> None:
    """The temporary server this process started, if any, stopped without Prefect's 5 s wait."""
    server_module = sys.modules.get("prefect.server.api.server")
    process = server_module and server_module.SubprocessASGIServer().server_process
    if not process:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()


def run_pipeline(config: PipelineConfig, fresh: bool, name: str | None) -> int:
    """`name`: the run's own (from --set run.name); else the flow generates one (mixtune/core/names.py)."""
    logging.getLogger("mixtune").setLevel(logging.INFO)
    started = time.perf_counter()
    from tasks.inputs import skip_if_unchanged

    try:
        # A no-new-data tick answered before torch is imported and Prefect's temporary server starts: a skip
        # run from the CLI leaves no Prefect flow run (a served or deployed tick goes through the flow and does).
        verdict = skip_if_unchanged(config)
        if verdict:
            print(format_skip(verdict, config, time.perf_counter() - started))
            return 0
        server_up = start_temporary_prefect_server()
        from flows.finetune import finetune
        from tasks.base_model import disk_need
        from tasks.footprint import require_free_space

        require_free_space(disk_need(config))  # the flow checks too (served runs); here before any wait
        server_up()
        summary = finetune(config, fresh=fresh, name=name)
    except Exception as err:
        return run_failed(config, err)
    print(format_summary(summary, time.perf_counter() - started))
    return 0


def start_temporary_prefect_server():
    """Without PREFECT_API_URL the flow's first API call starts Prefect's temporary server and waits for it (10-25 s
    on two cores). Started here, it boots in its own process while torch and transformers are imported. Returns
    the wait for the boot, which must end before the flow starts: a server marked running but not yet answering
    would not be waited for again. A boot that failed leaves it stopped, and the flow's own start says why."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer  # here, not in the thread: imports race otherwise

    def start() -> None:
        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    boot = threading.Thread(target=start, name="prefect-server-boot", daemon=True)
    boot.start()
    return boot.join


def run_failed(config: PipelineConfig, err: Exception) -> int:
    """Bad input, a full disk, too little free space to start or a tracking server that went away: one message,
    no traceback; anything else is a bug."""
    from mixtune.core.disk import DiskFull
    from tasks.footprint import DiskSpaceError
    from tasks.ingest import IngestError

    if isinstance(err, IngestError):
        print(unusable_input(err), file=sys.stderr)
        return 2
    if isinstance(err, DiskFull):
        print(f"mixtune: {err}", file=sys.stderr)
        return 1
    if isinstance(err, DiskSpaceError):
        print(f"mixtune: {err}", file=sys.stderr)
        return 2
    down = tracking_down(config)
    if down is None:
        raise err
    print(f"mixtune: the run failed: {down}\n  its MLflow runs end FAILED at the next start", file=sys.stderr)
    return 1


def unusable_input(err: Exception) -> str:
    """What `run` and `check` both say about an input `run` refuses."""
    return f"mixtune: unusable input, nothing was trained:\n  {err}"


def tracking_down(config: PipelineConfig) -> str | None:
    """Why the tracking server cannot be reached now, or None: after a failure, one line instead of tracebacks."""
    from mixtune.core.paths import tracking_uri
    from mixtune.core.preflight import Unreachable, check_tracking_server

    try:
        check_tracking_server(tracking_uri(config))
    except Unreachable as err:
        return str(err)
    return None


def deployments(config: PipelineConfig, args) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "mixtune: deployments need a Prefect server: run `prefect server start` and set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)",
            file=sys.stderr,
        )
        return 2
    from flows.deployments import deploy_to_pool, serve_deployments
    from flows.pool import PoolRefused
    from mixtune.core.policy import ServedPolicy

    policy = ServedPolicy.for_served(config, Path(args.config).resolve().parent)
    if args.command == "deploy":
        try:
            names = deploy_to_pool(config, args.pool, policy)
        except PoolRefused as err:
            print(f"mixtune: {err}", file=sys.stderr)
            return 2
        for name in names:
            print(f"deployment {name} on work pool {args.pool} (its job template: no command or env from a run)")
        return 0
    serve_deployments(config, policy)
    return 0


def compare(config: PipelineConfig, args) -> int:
    from mixtune.compare import compare as compare_runs
    from mixtune.core.paths import tracking_uri
    from mixtune.core.preflight import Unreachable, check_tracking_server

    uri, experiment = args.tracking_uri or tracking_uri(config), args.experiment or config.tracking.experiment
    try:
        check_tracking_server(uri)
    except Unreachable as err:
        print(f"mixtune: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(config.run.output_dir) / f"compare-{experiment}.png"
    table, plot = compare_runs(uri, experiment, out, config.registry.alias)
    if table is None:
        print(f"mixtune: no mixtune runs in experiment {experiment!r} at {uri}", file=sys.stderr)
        return 1
    print(table)
    if plot:
        print(f"\nplot (domain gain vs general drift): {plot}")
    return 0


def collect(config: PipelineConfig, args) -> int:
    from mixtune.core.paths import tracking_uri
    from mixtune.core.preflight import Unreachable, check_tracking_server
    from tasks.collect import collect as collect_runs

    keep_last = args.keep_last if args.keep_last is not None else config.run.retention or 1
    if keep_last < 1:
        print("mixtune: --keep-last must be at least 1", file=sys.stderr)
        return 2
    try:
        check_tracking_server(tracking_uri(config))
    except Unreachable as err:
        print(f"mixtune: {err}", file=sys.stderr)
        return 2
    print("\n".join(collect_runs(config, keep_last, args.dry_run).lines(args.dry_run)))
    return 0


def format_verdict(verdict) -> str:
    lines = [f"retraining: {verdict.decision}: {verdict.reason}"]
    if verdict.champion_version:
        lines.append(
            f"registered model {verdict.model_name}: alias {verdict.alias} -> version {verdict.champion_version}"
        )
    return "\n".join(lines)


def open_ui_lines(uri: str, experiment: str) -> list[str]:
    """The MLflow UI opens on GenAI traces; the URL goes straight to this experiment's runs."""
    from tasks.tracking import runs_page

    lines = [f"MLflow runs: {runs_page(uri, experiment)}"]
    if not uri.startswith(("http://", "https://")):
        lines.append(f"  (start the UI first: {mlflow_command()} ui --backend-store-uri {uri} --workers 1)")
    return lines


def format_skip(verdict, config: PipelineConfig, seconds: float) -> str:
    from mixtune.core.paths import tracking_uri

    uri = tracking_uri(config)
    return "\n".join(
        [
            format_verdict(verdict),
            "nothing trained (set registry.skip_unchanged=false to train anyway); the tick is counted on "
            f"run {verdict.previous_run}",
            f"wall time: {seconds:.0f} s",
            *open_ui_lines(uri, config.tracking.experiment),
        ]
    )


def format_summary(summary, seconds: float) -> str:
    if summary.baseline is None:
        return "\n".join(
            [
                format_verdict(summary.verdict),
                "nothing trained (set registry.skip_unchanged=false to train anyway)",
                f"wall time: {seconds:.0f} s",
                *open_ui_lines(summary.tracking_uri, summary.experiment),
            ]
        )
    tasks = sorted({*summary.baseline_tasks, *(name for r in summary.stages for name in r.task_metrics)})
    scores = lambda values: [f"{values[n]:.3f}" if n in values else "-" for n in tasks]  # noqa: E731
    headers = ["stage", "target", "realised", "domain val", "general val", "drift", "steps", "decision"]
    headers += [name.removeprefix("task/") for name in tasks]
    base = ["base", "", "", f"{summary.baseline.domain:.4f}", f"{summary.baseline.general:.4f}", "", "", ""]
    rows = [base + scores(summary.baseline_tasks)]
    for r in summary.stages:
        rows.append(
            [
                str(r.stage),
                f"{r.target_share:.3f}",
                f"{r.realised_share:.3f}",
                f"{r.losses.domain:.4f}",
                f"{r.losses.general:.4f}",
                f"{r.gate.general_drift:+.1%}",
                f"{r.steps}{'*' if r.stop_reason else ''}",
                r.gate.decision,
                *scores(r.task_metrics),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = ["", line(headers), line(["-" * w for w in widths]), *map(line, rows), ""]
    from tasks.generation_check import generation_flags

    for r in summary.stages:
        for flag in generation_flags(r.task_metrics):
            out.append(f"stage {r.stage} generation check: {flag} (read its general_answers.md)")
        if r.next_share:
            out.append(f"adaptive ramp after stage {r.stage}: {r.next_share.reason}")
        if r.stop_reason:  # it says which model the stage kept, and why
            out.append(f"* stage {r.stage} {'stopped early' if r.stopped_early else 'ended'}: {r.stop_reason}")
    if summary.baseline.general_eval is not None:
        out.append(
            f"drift: on the general_eval source(s), never trained on (base loss {summary.baseline.general_eval:.4f}); "
            "general val is the general sources' own held-out split"
        )
    if summary.stopped_reason:
        out.append(f"run stopped: {summary.stopped_reason}")
    if summary.interpolation:
        out.append(f"final model: {summary.final_model} (interpolated: {summary.interpolation.reason})")
    elif summary.final_stage == 0:
        out.append(f"final model: the base model, {summary.final_model} (no stage passed the gate)")
    else:
        out.append(f"final model: {summary.final_model} (stage {summary.final_stage})")
    if summary.verdict:
        out.append(format_verdict(summary.verdict))
    out += disk_lines(summary.disk)
    out.append(f"wall time: {seconds:.0f} s")
    out.append(f"MLflow run {summary.parent_run_id}")
    out += open_ui_lines(summary.tracking_uri, summary.experiment)
    return "\n".join(out)


def disk_lines(disk) -> list[str]:
    from tasks.retention import human

    if disk is None:
        return []
    lines = [f"left on disk: {human(disk.run_bytes)} in {disk.run_folder} (freed {human(disk.freed)} by run.keep)"]
    lines += [f"  shared with other runs: {what} ({human(size)})" for what, size in disk.shared.items()]
    if disk.collected_items:
        lines.append(f"  run.retention removed {disk.collected_items} old folders, freed {human(disk.collected)}")
    return lines


def mlflow_command() -> str:
    """The mlflow next to this interpreter (a venv's), so the printed command works without activating it."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"


if __name__ == "__main__":
    sys.exit(main())
