"""The generation check: each stage's answers to a few fixed general prompts, compared with the base model's.

Loss can miss a change of behaviour: after domain-only SFT a 135M model answered "Give three tips for staying
healthy" with one tip and stopped while its general loss fell 1.1%. So each stage is also read by what it
says: the length of its answers against the base's, the answers that end well short of the base's, those that
loop, and those whose shape (a list, several lines) is no longer the base's. The base's answers are generated
once per (weights, prompts, settings) and cached; a stage costs `generation_prompts` short greedy answers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prefect import task

from mixtune.core.cache import Entry, building, entry_dir, fingerprint, mark_complete
from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from tasks.answers import MAX_REPEATED_SHARE, repeated_share
from tasks.keys import BUNDLED_PROMPTS
from tasks.models import weights_digest
from tasks.probes import answer_probes
from tasks.records import SourceStats
from tasks.sources import data_scripts, in_scripts
from tasks.tracking import Tracker

CHECK_VERSION = 1
# An answer that ended by itself under a third of the base's length to the same prompt stopped early.
EARLY = 1 / 3
# A stage is flagged when this share of the prompts (or more) stop early, loop or lose their shape.
FLAG_SHARE = 1 / 3
LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)、]|[一二三四五六七八九十]+[、.])\s*", re.MULTILINE)


def general_prompts(stats: dict[str, SourceStats], count: int) -> list[str]:
    """The first `count` bundled general prompts written in the scripts of the run's data."""
    rows = [json.loads(line)["prompt"] for line in BUNDLED_PROMPTS.read_text(encoding="utf-8").splitlines() if line]
    return in_scripts(rows, data_scripts(stats))[:count]


def answer(model_dir: str, base_dir: str, prompts: list[str], config: PipelineConfig) -> list[dict]:
    asked = [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
    v = config.validation
    replies = answer_probes(model_dir, base_dir, asked, v.batch_size, max_new_tokens=v.generation_tokens)
    return [{"prompt": p, "answer": r["answer"], "ended": r["ended"]} for p, r in zip(prompts, replies)]


def base_answers(config: PipelineConfig, base_dir: str, prompts: list[str]) -> list[dict]:
    key = fingerprint(CHECK_VERSION, weights_digest(base_dir), prompts, config.validation.generation_tokens)
    folder = entry_dir(config.run.output_dir, Entry.GENERATION, key)
    with building(folder) as build:
        if build:
            (folder / "answers.json").write_text(json.dumps(answer(base_dir, base_dir, prompts, config)))
            mark_complete(folder)
    return json.loads((folder / "answers.json").read_text())


def shape(text: str) -> tuple[bool, bool]:
    """(a list, several lines): what a format change shows as, whatever the words."""
    return len(LIST_LINE.findall(text)) >= 2, len([line for line in text.splitlines() if line.strip()]) > 1


def stopped_early(base: dict, stage: dict) -> bool:
    return stage["ended"] and len(stage["answer"]) < EARLY * len(base["answer"])


def loops(said: dict) -> bool:
    return repeated_share(said["answer"]) > MAX_REPEATED_SHARE


def compare(base: list[dict], stage: list[dict]) -> dict[str, float]:
    """The stage's answers against the base's to the same prompts, as shares of the prompts. A loop counts
    where the base's answer did not loop: a weak base that loops everywhere flags no stage for it."""
    n = len(base)
    return {
        "gen/length_ratio": sum(len(s["answer"]) for s in stage) / max(sum(len(b["answer"]) for b in base), 1),
        "gen/stopped_early": sum(stopped_early(b, s) for b, s in zip(base, stage)) / n,
        "gen/looped": sum(loops(s) and not loops(b) for b, s in zip(base, stage)) / n,
        "gen/format_kept": sum(shape(b["answer"]) == shape(s["answer"]) for b, s in zip(base, stage)) / n,
    }


def generation_flags(metrics: dict[str, float]) -> list[str]:
    """What a person should read the stage's answers for; empty when they behave like the base's."""
    flags = []
    if metrics.get("gen/stopped_early", 0) >= FLAG_SHARE:
        flags.append(f"{metrics['gen/stopped_early']:.0%} of the general answers stop early")
    if metrics.get("gen/looped", 0) >= FLAG_SHARE:
        flags.append(f"{metrics['gen/looped']:.0%} of the general answers loop")
    if metrics.get("gen/format_kept", 1) <= 1 - FLAG_SHARE:
        flags.append(f"only {metrics['gen/format_kept']:.0%} of the general answers keep the base's format")
    return flags


def generation_check(
    config: PipelineConfig, model_dir: str, base_dir: str, stats: dict[str, SourceStats], folder: str
) -> dict[str, float]:
    """The stage's metrics; both sets of answers side by side in `folder`/general_answers.md."""
    prompts = general_prompts(stats, config.validation.generation_prompts)
    if not prompts:
        return {}
    base, stage = base_answers(config, base_dir, prompts), answer(model_dir, base_dir, prompts, config)
    lines = ["# General prompts: base model and this stage", ""]
    for b, s in zip(base, stage):
        lines += [f"## {b['prompt']}", f"- base: {b['answer']}", f"- stage: {s['answer']}", ""]
    Path(folder, "general_answers.md").write_text("\n".join(lines), encoding="utf-8")
    return compare(base, stage)


@task(name="generation-check", task_run_name="generation check stage {stage}", retries=2, retry_delay_seconds=[2, 10])
def generation_check_task(
    config: PipelineConfig,
    model_dir: str,
    base_dir: str,
    stats: dict[str, SourceStats],
    folder: str,
    tracker: Tracker,
    stage: int,
) -> dict[str, float]:
    """Logged at step `stage` on the stage's run and the parent's, like the task metrics."""
    metrics = generation_check(config, model_dir, base_dir, stats, folder)
    if not metrics:
        return metrics
    tracker.log_metrics(metrics, step=stage)
    tracker.parent().log_metrics(metrics, step=stage)
    tracker.log_artifacts(Path(folder) / "general_answers.md")
    shown = ", ".join(f"{name.removeprefix('gen/')} {value:.2f}" for name, value in metrics.items())
    run_logger().info("stage %d generation check: %s", stage, shown)
    for flag in generation_flags(metrics):
        run_logger().warning("stage %d generation check: %s (read %s/general_answers.md)", stage, flag, folder)
    return metrics
