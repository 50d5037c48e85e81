"""Validation: domain and general validation loss of the base model and of each stage's saved model, and
their answers to the fixed probe prompts, recorded in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import task

from mixtune.core.cache import Entry, building, entry_dir, fingerprint, mark_complete
from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from tasks.answers import correct
from tasks.choices import answer_by_loglik
from tasks.mlflow_names import BASE, FINAL, Metric, val_loss
from tasks.models import evaluate, set_losses, weights_digest
from tasks.probes import PROBE_TOKENS, answer_probes, format_probes
from tasks.records import StageTraining, TokenLosses
from tasks.tables import validation_digest
from tasks.tracking import Tracker, metric_name

BASELINE_VERSION = 1


def validate_base(
    config: PipelineConfig, base_dir: str, sft_path: str, probes: list[dict], tracker: Tracker
) -> TokenLosses:
    """The base model's losses and probe answers, measured once per (base weights, validation sets, probes):
    a rerun on the same ones reads them from the cache, and logs them to its own run all the same."""
    folder = entry_dir(config.run.output_dir, Entry.BASELINE, baseline_key(config, base_dir, sft_path, probes))
    with building(folder) as build:
        if build:
            measure_base(config, base_dir, sft_path, probes, folder)
        else:
            run_logger().info("base model: losses and probe answers reused from %s (same weights and sets)", folder)
    losses = TokenLosses.model_validate_json((folder / "losses.json").read_text())
    tracker.log_metrics({BASE + name: value for name, value in loss_metrics(losses).items()}, step=0)
    tracker.log_text((folder / "probes.md").read_text(), "probes/stage-0-base.md")
    return losses


def baseline_key(config: PipelineConfig, base_dir: str, sft_path: str, probes: list[dict]) -> str:
    """The weights' and the sets' content, not their paths: the same base model saved elsewhere, or the same
    validation rows re-tokenised into another cache entry, is the same baseline."""
    generation = (PROBE_TOKENS, config.validation.probe_timeout_s)
    return fingerprint(BASELINE_VERSION, weights_digest(base_dir), validation_digest(sft_path), probes, generation)


def measure_base(config: PipelineConfig, base_dir: str, sft_path: str, probes: list[dict], folder: Path) -> None:
    batch, timeout = config.validation.batch_size, config.validation.probe_timeout_s
    losses = evaluate(base_dir, base_dir, sft_path, batch, label="baseline: validation loss")
    answers = answer_probes(base_dir, base_dir, probes, batch, timeout, label="baseline: probe answers")
    (folder / "losses.json").write_text(losses.model_dump_json())
    (folder / "probes.md").write_text(format_probes("Base model", answers))
    mark_complete(folder)


def validate_stage(
    config: PipelineConfig, trained: StageTraining, sft_path: str, base_dir: str, probes: list[dict], tracker: Tracker
) -> TokenLosses:
    """The stage's best model, reloaded from disk, on the domain and the general validation sets; and its
    answers to the fixed probe prompts, in the stage's run and in the parent's."""
    losses = stage_losses(config, trained, sft_path, base_dir)
    numbers = {FINAL + name: value for name, value in loss_metrics(losses).items()}
    tracker.log_metrics(
        {**numbers, Metric.STAGE_TOKENS_PER_SECOND: trained.tokens_per_second}, step=trained.global_step
    )
    answers = answer_probes(
        trained.model_dir,
        base_dir,
        probes,
        config.validation.batch_size,
        config.validation.probe_timeout_s,
        label=f"stage {trained.stage}: probe answers",
    )
    text = format_probes(f"Stage {trained.stage}", answers)
    tracker.log_text(text, "probes.md")
    tracker.parent().log_text(text, f"probes/stage-{trained.stage}.md")
    return losses


def loss_metrics(losses: TokenLosses) -> dict[str, float]:
    """domain_val_loss, general_val_loss and, with general_eval sources, general_eval_val_loss."""
    return {val_loss(tag): value for tag, value in losses.model_dump(exclude_none=True).items()}


def stage_losses(config: PipelineConfig, trained: StageTraining, sft_path: str, base_dir: str) -> TokenLosses:
    """The restored checkpoint was evaluated on these very sets during training: while the weights on disk are
    the ones saved from it, that evaluation is the answer, and a second pass over the sets is only time."""
    if trained.best_losses is not None and trained.weights_digest == weights_digest(trained.model_dir):
        run_logger().info(
            "stage %d: validation reuses the in-training evaluation of step %s (weights unchanged)",
            trained.stage,
            trained.best_step,
        )
        if trained.best_losses.general_eval is not None:  # training evaluated the general_eval rows too
            return trained.best_losses
        held_apart = set_losses(trained.model_dir, base_dir, sft_path, config.validation.batch_size, ("general_eval",))
        return trained.best_losses.model_copy(update=held_apart)
    label = f"stage {trained.stage}: validation loss"
    return evaluate(trained.model_dir, base_dir, sft_path, config.validation.batch_size, label=label)


@task(name="baseline", task_run_name="baseline (base model)", retries=2, retry_delay_seconds=[2, 10])
def baseline_task(
    config: PipelineConfig, base_dir: str, sft_path: str, probes: list[dict], tracker: Tracker
) -> TokenLosses:
    losses = validate_base(config, base_dir, sft_path, probes, tracker)
    run_logger().info("base model: domain val loss %.4f, general val loss %.4f", losses.domain, losses.general)
    return losses


@task(name="validate", task_run_name="validate stage {trained.stage}", retries=2, retry_delay_seconds=[2, 10])
def validate_task(
    config: PipelineConfig, trained: StageTraining, sft_path: str, base_dir: str, probes: list[dict], tracker: Tracker
) -> TokenLosses:
    losses = validate_stage(config, trained, sft_path, base_dir, probes, tracker)
    run_logger().info(
        "stage %d: domain val loss %.4f, general val loss %.4f", trained.stage, losses.domain, losses.general
    )
    return losses


def eval_rows(sft_path: str, samples_path: str, label: str, count: int) -> list[dict]:
    """A source's first `count` validation rows by id, as prompt and reference: the same rows for the base
    model and every stage."""
    val = pd.read_parquet(sft_path, columns=["sample_id"], filters=[("split", "==", "val"), ("source", "==", label)])
    ids = sorted(val["sample_id"].unique())[:count]
    if not ids:
        return []
    texts = pd.read_parquet(samples_path, columns=["sample_id", "messages"], filters=[("sample_id", "in", ids)])
    rows = []
    for messages in texts.drop_duplicates("sample_id").sort_values("sample_id")["messages"]:
        turns = json.loads(messages)
        rows.append({"set": label, "prompt": turns[:-1], "reference": turns[-1]["content"]})
    return rows


def task_metrics(config: PipelineConfig, model_dir: str, base_dir: str, sft_path: str, samples_path: str) -> dict:
    """Per source with an `eval`: the share of its scored validation rows answered right (greedy, or the option
    letter of highest log-likelihood for loglik_choice)."""
    metrics = {}
    for source in config.data.sources:
        rows = eval_rows(sft_path, samples_path, source.label, source.eval.max_samples) if source.eval else []
        if not rows:
            continue
        batch, label = config.validation.batch_size, f"task metrics: {source.label}"
        if source.eval.metric == "loglik_choice":
            answers = answer_by_loglik(model_dir, base_dir, rows, max(1, batch // 4), label)
        else:
            answers = answer_probes(
                model_dir, base_dir, rows, batch, max_new_tokens=source.eval.max_new_tokens, label=label
            )
        right = sum(correct(source.eval.metric, a["answer"], a["reference"]) for a in answers)
        metrics[f"task/{metric_name(source.label)}/{source.eval.metric}"] = right / len(answers)
    return metrics


@task(name="task-metrics", task_run_name="task metrics stage {stage}", retries=2, retry_delay_seconds=[2, 10])
def task_metrics_task(
    config: PipelineConfig,
    model_dir: str,
    base_dir: str,
    sft_path: str,
    samples_path: str,
    tracker: Tracker,
    stage: int,
) -> dict[str, float]:
    """Stage 0 is the base model. Logged at step `stage` on the parent run, so each metric is one series from
    the base on, and on the stage's own run."""
    metrics = task_metrics(config, model_dir, base_dir, sft_path, samples_path)
    if metrics:
        tracker.log_metrics(metrics, step=stage)
        if tracker.stage is not None:
            tracker.parent().log_metrics(metrics, step=stage)
        shown = ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
        run_logger().info("%s: %s", f"stage {stage}" if stage else "base model", shown)
    return metrics
