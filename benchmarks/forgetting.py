"""Forgetting: does mixing domain data into general data on a rising schedule keep general ability while the
model learns the domain? Measured from one base model, on one set of validation rows, at equal compute.

    python benchmarks/forgetting.py [--out forgetting-bench] [--config pipeline.yaml] [--base MODEL_DIR]
                                    [--samples-per-stage 128] [--stages 4] [--max-seq-len 512]
                                    [--preset small] [--vocab-size 6400] [--pretrain-epochs 1]
                                    [--pretrain-steps 60] [--base-samples 256] [--arms domain-only,ramp,...]

Arms, each an ordinary `mixtune run <out>/configs/<arm>.yaml --fresh` (the commands are printed, so the same
arms can be run by hand), all into the MLflow experiment `forgetting` of one SQLite database, <out>/mlflow.db:

    domain-only        full SFT, domain share 1.0 in every stage
    fixed-30, fixed-50 full SFT, domain share 0.3 / 0.5 in every stage
    ramp               full SFT, 0.1 -> 0.5 over the stages (linear): the claim
    adaptive           full SFT, `schedule.shape: adaptive` from 0.1 toward 0.5, steered by the forgetting budget
    lora-ramp          LoRA on the ramp
    lora-domain-only   LoRA, domain share 1.0 in every stage
    self-rehearsal     domain source only, `data.rehearsal: self`: the general side is the base model's own
                       answers; measured on the general sources' validation rows like every other arm

Equal compute: every arm trains `--stages` stages of `--samples-per-stage` samples, evaluated only at each
stage's end (no early stop cuts a stage short; the best checkpoint is the last), so the arms differ only in
what they train on. The forgetting gate is off for the fixed schedules (budget GATE_OFF): the point is to
measure how far general loss drifts, not to stop the run that drifts. The adaptive ramp keeps the budget
(it steers by it), holds instead of stopping (so it also trains every stage) and delivers its best stage
within the budget, as it would in production. Arms share `run.seed`, the general and domain sources and the
validation settings, so every arm has the very same validation rows and the same base-model losses (the
table checks this); caches are keyed by their inputs, so what arms share (ingest, tokens, base-model losses)
is identical by construction.

Base model: by default a scratch `small` model (Llama classes in MiniMind's layout) pre-trained on the shared
pre-training text, then given general chat ability by a general-only SFT run (domain share 0) into the
experiment `forgetting-base`; its final folder is every arm's `model.path`, pre-training off. `--base DIR` uses
any local Hugging Face model folder instead (then the learning rates are mixtune's defaults for a pretrained
model unless the config sets them). `--config` takes your pipeline.yaml: its sources, model, training and
validation settings, with the schedule, method and the fields above overridden per arm.

Data (default): general = ../shared/data/general_en_selfinstruct + general_zh_cmrc2018; domain = huatuo
(medical, Chinese); pre-training = wiki, c4 and the cmrc contexts. The cmrc contexts are also inside the
cmrc conversations, validation rows included: the base has read the general validation contexts (not the
questions), the same for every arm, so gains and drifts compare; absolute general losses are optimistic.
Task metric: `exact_match` on cmrc2018 (extractive reading comprehension: short span answers, compared by
their final number, else their text); none on huatuo, whose answers are free-text paragraphs that an exact
match would score near 0 for any model. A scratch model this small scores about 0 on cmrc too: the column
is there for `--base` with a real model.

Output in --out: table.md (the markdown table, also printed), compare.txt and compare-forgetting.png
(`mixtune compare` on the experiment), configs/, logs/ (each run's output), runs/ (caches, checkpoints).

Budget: the defaults (a `small` model, 4x128 in MiniMind's layout with its 6,400-token vocabulary, about 1.7M
parameters; 512 tokens, since cmrc's contexts are long and a sample cut before its answer has no labels; 60
pre-training steps; 256 general SFT samples for the base; 4 stages of 128 samples per arm; 100 validation rows
per source) aim at 30 minutes on 2 CPU cores, base creation included. On a GPU, scale up, e.g.
`--preset minimind2-small --max-seq-len 1024 --pretrain-steps 5000 --base-samples 50000
--samples-per-stage 20000` (bf16 comes from `train.precision: auto`), or `--base` with a real model.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixtune.core.config import PipelineConfig, load_config, validate_config  # noqa: E402

EXPERIMENT, BASE_EXPERIMENT = "forgetting", "forgetting-base"
# A forgetting budget no run reaches (general loss 11x the base's): the gate and the mid-stage stop stay off.
GATE_OFF = 10.0
# Evaluate only at a stage's end (EvaluateAtEnd always evaluates the last step): the last step is the best
# checkpoint and patience never ends a stage early, so every arm trains the same steps.
END_ONLY = 1_000_000
# A scratch model learns at rates that would wreck a pretrained one (README: Learning rates); LoRA needs a
# higher one than full SFT to move a tiny model at all (README: Compare experiments, the LoRA run).
SCRATCH_LR = {"full": 1e-3, "lora": 5e-3}
DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    schedule: dict  # replaces the schedule's shape fields; stages and samples_per_stage are shared
    gated: bool = False  # keeps the config's forgetting budget (the adaptive ramp steers by it); else GATE_OFF
    validation: dict = field(default_factory=dict)  # on top of the shared, end-only validation
    data: dict = field(default_factory=dict)  # e.g. the rehearsal switch


def arm_list(stages: int) -> list[Arm]:
    """Every arm of the benchmark. The adaptive ramp runs last: `mixtune compare` draws the newest run's
    forgetting budget as its line, and only the adaptive arm has a real one."""
    ramp = {"start": 0.1, "end": 0.5, "shape": "linear"}
    arms = [
        Arm("domain-only", "full", {"shares": [1.0] * stages}),
        Arm("fixed-30", "full", {"shares": [0.3] * stages}),
        Arm("fixed-50", "full", {"shares": [0.5] * stages}),
        Arm("ramp", "full", ramp),
        Arm("lora-ramp", "lora", ramp),
        Arm("lora-domain-only", "lora", {"shares": [1.0] * stages}),
        # the general half of the mix is the model's own answers: no general source at all
        Arm("self-rehearsal", "full", ramp, data={"rehearsal": "self"}),
    ]
    # hold, never stop, so that it trains every stage; its share after a breach is the rule's own
    adaptive = {"on_forgetting": "hold", "max_guard_actions": stages}
    arms.append(Arm("adaptive", "full", {"start": 0.1, "end": 0.5, "shape": "adaptive"}, True, adaptive))
    return arms


def select_arms(arms: list[Arm], names: list[str] | None) -> list[Arm]:
    if not names:
        return arms
    known = {a.name for a in arms}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(a.name for a in arms)}")
    return [a for a in arms if a.name in names]


def default_raw_config(data: Path = DATA) -> dict:
    """The benchmark's own pipeline on the shared public data (README: Config reference)."""
    cmrc_eval = {"metric": "exact_match", "max_samples": 30, "max_new_tokens": 24}
    val = {"max_val_samples": 100}  # validation is forward passes at every stage end of every arm
    return {
        "run": {"name": "forgetting", "seed": 0},
        "data": {
            "sources": [
                {"path": str(data / "general_en_selfinstruct.alpaca.jsonl"), "role": "general", **val},
                {"path": str(data / "general_zh_cmrc2018.minimind.jsonl"), "role": "general", "eval": cmrc_eval, **val},
                {"path": str(data / "domain_med_zh_huatuo.alpaca.jsonl"), "role": "domain", **val},
                {"path": str(data / "pretrain_en_wiki.txt"), "role": "pretrain"},
                {"path": str(data / "pretrain_en_c4.jsonl"), "role": "pretrain"},
                {"path": str(data / "pretrain_zh_cmrc_contexts.jsonl"), "role": "pretrain"},
            ]
        },
        "model": {"preset": "small", "vocab_size": 6400, "max_seq_len": 512},
        # pre-training reads the general conversations as text too: ~2.9M tokens an epoch, an hour here; capped
        "pretrain": {"epochs": 1, "max_steps": 60},
        "schedule": {"stages": 4, "samples_per_stage": 128},
        "train": {"method": "full", "batch_size": 16},
        "validation": {"forgetting_budget": 0.10},
    }


def merged(raw: dict, overrides: dict) -> dict:
    """`raw` with `overrides` laid over it, section by section (a deep copy: arms never share a dict)."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def learning_rate(config: PipelineConfig, method: str, scratch_base: bool) -> float | None:
    """The config's rate when it is for this method; else a scratch base's rate, or None: mixtune's default
    for a pretrained model (2e-5 full, 1e-4 LoRA)."""
    if config.train.learning_rate is not None and config.train.method == method:
        return config.train.learning_rate
    return SCRATCH_LR[method] if scratch_base else None


def tracking_uri(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'mlflow.db'}"


def measurement(config: PipelineConfig, out: Path, name: str, experiment: str, budget: float) -> dict:
    """What every run of the benchmark (the base's too) is given: its name, the shared seed, output folder and
    database, end-only evaluation, the forgetting budget, and no skip of unchanged inputs."""
    return {
        "run": {"name": name, "output_dir": str(out / "runs"), "seed": config.run.seed},
        "validation": {
            "eval_steps": END_ONLY,
            "first_eval_step": END_ONLY,
            "stop_mid_stage": False,
            "forgetting_budget": budget,
        },
        # stage models are not results here: logging each costs time and disk
        "tracking": {"tracking_uri": tracking_uri(out), "experiment": experiment, "log_models": False},
        "registry": {"skip_unchanged": False},
        "plan": "manual",  # the arm is the recipe: the advisor must not swap method or schedule
        "goal": "behaviour",  # no continued pre-training inside an arm: the base is already pre-trained
    }


def arm_schedule(config: PipelineConfig, arm: Arm) -> dict:
    """The arm's shape fields over the schema's defaults (a user's shares must not leak into a ramp), with
    the shared stage count and size."""
    shape = {"shape": "linear", **arm.schedule}
    return {**shape, "stages": config.schedule.stages, "samples_per_stage": config.schedule.samples_per_stage}


def arm_config(config: PipelineConfig, arm: Arm, base: str, scratch_base: bool, out: Path) -> dict:
    """One arm's config: the user's, with the base model, the arm's schedule and method, and the shared
    measurement settings. Pre-training sources are dropped (the base is already pre-trained); the split of
    every other source depends only on that source and the seed, so validation rows are the same for all."""
    raw = config.model_dump(mode="json")
    keep = ("domain",) if arm.data.get("rehearsal") else ("general", "domain")
    raw["schedule"] = arm_schedule(config, arm)
    budget = config.validation.forgetting_budget if arm.gated else GATE_OFF
    overrides = measurement(config, out, arm.name, EXPERIMENT, budget)
    overrides["validation"].update(arm.validation)
    overrides |= {
        "data": {"sources": [s for s in raw["data"]["sources"] if s["role"] in keep], **arm.data},
        "model": {"path": base},
        "pretrain": {"enabled": False},
        "train": {"method": arm.method, "learning_rate": learning_rate(config, arm.method, scratch_base)},
    }
    return merged(raw, overrides)


def base_config(config: PipelineConfig, samples: int, out: Path) -> dict:
    """The base: a scratch model pre-trained on the pre-training sources, then one general-only SFT stage
    (domain share 0; the domain source is there for its validation set, which the schema requires)."""
    raw = config.model_dump(mode="json")
    raw["schedule"] = {"shares": [0.0], "stages": 1, "samples_per_stage": samples}
    return merged(
        raw,
        {
            **measurement(config, out, "base-general", BASE_EXPERIMENT, GATE_OFF),
            "pretrain": {"enabled": True},
            "train": {"method": "full", "learning_rate": learning_rate(config, "full", True)},
        },
    )


def write_config(raw: dict, path: Path) -> Path:
    """Written only after the schema accepts it, so a bad arm fails here, naming the field, not in a run."""
    validate_config(copy.deepcopy(raw), path, base_dir=path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# --- running ---------------------------------------------------------------------------------------------

Runner = Callable[[list[str], Path], None]  # mixtune's CLI arguments, the log file


def run_cli(args: list[str], log: Path) -> None:
    """`mixtune ARGS` in a fresh process (as a user runs it), its output in `log`; fails with the log's tail."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as handle:
        code = subprocess.call(
            [sys.executable, "-m", "mixtune.cli", *args], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
    if code:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(f"mixtune {' '.join(args)} failed (exit {code}); log {log}:\n{tail}")


def run_command(config_path: Path) -> list[str]:
    # --fresh: never adopt an interrupted earlier run of the same inputs (its wall time would not be this arm's)
    return ["run", str(config_path), "--fresh"]


def timed(runner: Runner, args: list[str], log: Path) -> float:
    started = time.perf_counter()
    runner(args, log)
    return time.perf_counter() - started


# --- reading the results (MLflow) ---------------------------------------------------------------------------


def parent_run(client, experiment: str, name: str):
    """The newest pipeline run of `name` in the experiment."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`mixtune.kind` = 'pipeline' and tags.`mixtune.run_name` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise RuntimeError(f"no MLflow run named {name} in experiment {experiment}")
    return runs[0]


def final_model_dir(client, experiment: str, name: str) -> str:
    """The folder of a run's delivered model (HF-loadable: stage-N/final)."""
    from mixtune.core.paths import stage_dir

    tags = parent_run(client, experiment, name).data.tags
    stage = int(tags["mixtune.final_stage"])
    if stage == 0:
        raise RuntimeError(f"run {name} delivered its own base model: no stage passed its gate")
    return str(stage_dir(tags["mixtune.run_folder"], stage) / "final")


def arm_record(client, experiment: str, name: str, wall_s: float) -> dict:
    """Everything the table needs from one arm's MLflow runs: base and final losses and task metrics (parent
    run), and per stage its share, samples and steps (stage runs; steps: the step `general_drift` is logged at,
    the stage's last)."""
    run = parent_run(client, experiment, name)
    metrics = run.data.metrics
    tasks = sorted(k.removeprefix("final_task/") for k in metrics if k.startswith("final_task/"))
    base_tasks = {}
    for task in tasks:
        history = client.get_metric_history(run.info.run_id, f"task/{task}")
        base_tasks[task] = next((m.value for m in history if m.step == 0), None)
    stages = []
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    for child in sorted(children, key=lambda r: int(r.data.params["stage"])):
        drift = client.get_metric_history(child.info.run_id, "general_drift")
        stages.append(
            {
                "stage": int(child.data.params["stage"]),
                "target": float(child.data.params["target_domain_share"]),
                "realised": float(child.data.params["realised_domain_share"]),
                "samples": int(child.data.params["samples"]),
                "steps": max((m.step for m in drift), default=0),
                "decision": child.data.tags.get("mixtune.decision", ""),
            }
        )
    return {
        "arm": name,
        "method": run.data.tags.get("mixtune.method", ""),
        "run_id": run.info.run_id,
        "base": {"domain": metrics["base_domain_val_loss"], "general": metrics["base_general_val_loss"]},
        "final": {"domain": metrics["final_domain_val_loss"], "general": metrics["final_general_val_loss"]},
        "base_tasks": base_tasks,
        "final_tasks": {t: metrics[f"final_task/{t}"] for t in tasks},
        "final_stage": int(run.data.tags.get("mixtune.final_stage", 0)),
        "stages": stages,
        "wall_s": wall_s,
    }


def common_validation_table(out: Path) -> Path:
    """The token table of a run that read the real general sources. Each source's validation split depends only
    on that source and the seed, so every such run holds the same validation rows: any one will do."""
    from tasks.rehearse import LABEL

    for report in sorted((out / "runs" / "cache").glob("tokens-*/data_report.json")):
        if LABEL not in report.read_text(encoding="utf-8"):
            return report.parent / "sft.parquet"
    raise RuntimeError(f"no token table under {out / 'runs' / 'cache'} holds the general sources' validation rows")


def remeasured(record: dict, client, base: str, out: Path, batch_size: int) -> dict:
    """A self-rehearsal arm validates on held-out answers of its own base, not on the general sources' rows. For
    the table, its base and delivered model are measured again on those rows, which it never trained on, the
    same way the other arms were (mixtune's own evaluation, the config's batch size)."""
    from tasks.models import evaluate

    table = str(common_validation_table(out))
    final = final_model_dir(client, EXPERIMENT, record["arm"])
    losses = {"base": evaluate(base, base, table, batch_size), "final": evaluate(final, base, table, batch_size)}
    return {**record, **{key: value.model_dump() for key, value in losses.items()}}


# --- the table (pure) --------------------------------------------------------------------------------------


def result_rows(records: list[dict]) -> list[dict]:
    """Per arm: domain gain (base - final) / base and general drift (final - base) / base, both on the arm's
    delivered model, with the compute it spent."""
    rows = []
    for r in records:
        base, final = r["base"], r["final"]
        stages = r["stages"]
        rows.append(
            {
                "arm": r["arm"],
                "method": r["method"],
                "shares": " ".join(f"{s['realised']:.2f}" for s in stages),
                "steps": sum(s["steps"] for s in stages),
                "samples": sum(s["samples"] for s in stages),
                "domain samples": sum(round(s["samples"] * s["realised"]) for s in stages),
                "base domain": base["domain"],
                "base general": base["general"],
                "domain val": final["domain"],
                "general val": final["general"],
                "domain gain": (base["domain"] - final["domain"]) / base["domain"],
                "general drift": (final["general"] - base["general"]) / base["general"],
                "tasks": dict(r["final_tasks"]),
                "base tasks": dict(r["base_tasks"]),
                "delivered": f"stage {r['final_stage']}/{len(stages)}",
                "wall s": r["wall_s"],
            }
        )
    return rows


def one_base(rows: list[dict]) -> tuple[float, float]:
    """The base losses every arm was measured against; arms that disagree did not share validation rows or
    base model, and their gains and drifts would not compare."""
    bases = {(round(r["base domain"], 6), round(r["base general"], 6)) for r in rows}
    if len(bases) != 1:
        raise ValueError(f"arms were measured against different base losses: {sorted(bases)}")
    return rows[0]["base domain"], rows[0]["base general"]


def markdown_table(rows: list[dict]) -> str:
    base_domain, base_general = one_base(rows)
    tasks = sorted({t for r in rows for t in r["tasks"]})
    header = ["arm", "method", "domain share per stage", "steps", "samples", "domain samples"]
    header += ["domain val", "general val", "domain gain", "general drift", *tasks, "delivered", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        cells = [r["arm"], r["method"], r["shares"], f"{r['steps']:,}", f"{r['samples']:,}", f"{r['domain samples']:,}"]
        cells += [f"{r['domain val']:.4f}", f"{r['general val']:.4f}"]
        cells += [f"{r['domain gain']:+.1%}", f"{r['general drift']:+.1%}"]
        cells += [f"{r['tasks'][t]:.3f}" if t in r["tasks"] else "-" for t in tasks]
        cells += [r["delivered"], f"{r['wall s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    base_scores = {t: rows[0]["base tasks"].get(t) for t in tasks}
    shown = ", ".join(f"{t} {v:.3f}" for t, v in base_scores.items() if v is not None)
    note = (
        f"Base model: domain val loss {base_domain:.4f}, general val loss {base_general:.4f}"
        + (f", {shown}" if shown else "")
        + ". Domain gain = (base - final) / base domain val loss (up is learning); general drift = (final - base) "
        "/ base general val loss (up is forgetting); both on each arm's delivered model."
    )
    return "\n".join([*lines, "", note])


# --- the benchmark ---------------------------------------------------------------------------------------


def make_base(config: PipelineConfig, samples: int, out: Path, runner: Runner) -> tuple[str, float]:
    path = write_config(base_config(config, samples, out), out / "configs" / "base-general.yaml")
    print(f"base: mixtune {' '.join(run_command(path))}", flush=True)
    seconds = timed(runner, run_command(path), out / "logs" / "base-general.log")
    from tasks.tracking import client_for

    folder = final_model_dir(client_for(tracking_uri(out)), BASE_EXPERIMENT, "base-general")
    print(f"base: {folder} ({seconds:.0f} s)", flush=True)
    return folder, seconds


def run_benchmark(
    config: PipelineConfig,
    out: Path,
    base: str | None = None,
    arm_names: list[str] | None = None,
    base_samples: int | None = None,
    runner: Runner = run_cli,
) -> dict:
    """Base (unless given), every arm, `mixtune compare`; returns the rows, the markdown and the wall times."""
    from tasks.tracking import client_for

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    scratch_base = base is None and config.model.path is None
    walls = {}
    if scratch_base:
        base, walls["base-general"] = make_base(
            config, base_samples or 2 * config.schedule.samples_per_stage, out, runner
        )
    base = base or config.model.path
    arms = select_arms(arm_list(config.schedule.stages), arm_names)
    paths = {
        a.name: write_config(arm_config(config, a, base, scratch_base, out), out / "configs" / f"{a.name}.yaml")
        for a in arms
    }
    print("arms (each is one command; run them yourself on your own config the same way):")
    for path in paths.values():
        print(f"  mixtune {' '.join(run_command(path))}")
    client, records = client_for(tracking_uri(out)), []
    failed = {}
    for arm in arms:
        try:
            walls[arm.name] = timed(runner, run_command(paths[arm.name]), out / "logs" / f"{arm.name}.log")
        except RuntimeError as err:  # one arm that cannot run (a base that cannot answer) must not sink the rest
            failed[arm.name] = why_failed(str(err))
            print(f"arm {arm.name}: failed: {failed[arm.name]}", flush=True)
            continue
        record = arm_record(client, EXPERIMENT, arm.name, walls[arm.name])
        if arm.data.get("rehearsal"):
            record = remeasured(record, client, base, out, config.validation.batch_size)
        records.append(record)
        print(f"arm {arm.name}: {walls[arm.name]:.0f} s", flush=True)
    plot = out / f"compare-{EXPERIMENT}.png"
    compare_args = ["compare", str(next(iter(paths.values()))), "--experiment", EXPERIMENT]
    compare_args += ["--tracking-uri", tracking_uri(out), "--out", str(plot)]
    walls["compare"] = timed(runner, compare_args, out / "compare.txt")
    rows = result_rows(records)
    table = markdown_table(rows) + "".join(f"\n\nArm {name} did not finish: {why}" for name, why in failed.items())
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    walls["total"] = time.perf_counter() - started
    return {
        "rows": rows,
        "markdown": table,
        "walls": walls,
        "failed": failed,
        "compare": out / "compare.txt",
        "plot": plot,
    }


def why_failed(error: str) -> str:
    """mixtune's own message from the log's tail (the lines from its last `mixtune:` line), else the last line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("mixtune:") and " failed (exit " not in line]
    return " ".join(lines[starts[-1] : starts[-1] + 2]) if starts else lines[-1]


def knob_overrides(args) -> list[str]:
    """The size knobs given on the command line, as `--set` overrides."""
    knobs = {
        "model.preset": args.preset,
        "model.vocab_size": args.vocab_size,
        "model.max_seq_len": args.max_seq_len,
        "schedule.samples_per_stage": args.samples_per_stage,
        "schedule.stages": args.stages,
        "pretrain.epochs": args.pretrain_epochs,
        "pretrain.max_steps": args.pretrain_steps,
    }
    return [f"{key}={value}" for key, value in knobs.items() if value is not None]


def load_benchmark_config(args, out: Path) -> PipelineConfig:
    """The user's pipeline.yaml, or the default one written to the output folder (so it can be read and
    reused), with the size knobs applied as mixtune's own overrides."""
    path = Path(args.config) if args.config else out / "configs" / "pipeline.yaml"
    if not args.config:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(default_raw_config(), sort_keys=False), encoding="utf-8")
    return load_config(path, knob_overrides(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="forgetting-bench", help="output folder (must not hold an earlier run)")
    parser.add_argument("--config", help="your pipeline.yaml: the arms are derived from it")
    parser.add_argument("--base", help="a local Hugging Face model folder to start every arm from")
    parser.add_argument("--arms", help="comma-separated subset of the arms")
    parser.add_argument("--samples-per-stage", type=int, default=None)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--preset", choices=["tiny", "small", "minimind2-small"], default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=float, default=None)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="cap on pre-training steps")
    parser.add_argument("--base-samples", type=int, default=None, help="general SFT samples of the scratch base")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if (out / "mlflow.db").exists():
        raise SystemExit(f"{out} holds an earlier benchmark (mlflow.db): give a new --out")
    config = load_benchmark_config(args, out)
    base = str(Path(args.base).resolve()) if args.base else None
    result = run_benchmark(config, out, base, args.arms.split(",") if args.arms else None, args.base_samples)
    print(result["compare"].read_text(encoding="utf-8"))
    print(result["markdown"])
    print("\nwall time: " + ", ".join(f"{name} {s:.0f} s" for name, s in result["walls"].items()))
    print(f"table: {out / 'table.md'}; plot: {result['plot']}; MLflow: {tracking_uri(out)}")


if __name__ == "__main__":
    main()
