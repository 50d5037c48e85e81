"""Validation: domain and general validation loss of the base model and of each stage's saved model, and
their answers to the fixed probe prompts, recorded in MLflow."""

from __future__ import annotations

from prefect import task

from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from tasks.models import evaluate, weights_digest
from tasks.probes import answer_probes, format_probes
from tasks.records import StageTraining, TokenLosses
from tasks.tracking import Tracker


def validate_base(
    config: PipelineConfig, base_dir: str, sft_path: str, probes: list[dict], tracker: Tracker
) -> TokenLosses:
    losses = evaluate(base_dir, base_dir, sft_path, config.validation.batch_size)
    tracker.log_metrics({"base_domain_val_loss": losses.domain, "base_general_val_loss": losses.general}, step=0)
    text = format_probes("Base model", answer_probes(base_dir, base_dir, probes))
    tracker.log_text(text, "probes/stage-0-base.md")
    return losses


def validate_stage(
    config: PipelineConfig, trained: StageTraining, sft_path: str, base_dir: str, probes: list[dict], tracker: Tracker
) -> TokenLosses:
    """The stage's best model, reloaded from disk, on the domain and the general validation sets; and its
    answers to the fixed probe prompts, in the stage's run and in the parent's."""
    losses = stage_losses(config, trained, sft_path, base_dir)
    tracker.log_metrics(
        {
            "final_domain_val_loss": losses.domain,
            "final_general_val_loss": losses.general,
            "stage_tokens_per_second": trained.tokens_per_second,
        },
        step=trained.global_step,
    )
    text = format_probes(f"Stage {trained.stage}", answer_probes(trained.model_dir, base_dir, probes))
    tracker.log_text(text, "probes.md")
    tracker.parent().log_text(text, f"probes/stage-{trained.stage}.md")
    return losses


def stage_losses(config: PipelineConfig, trained: StageTraining, sft_path: str, base_dir: str) -> TokenLosses:
    """The restored checkpoint was evaluated on these very sets during training: while the weights on disk are
    the ones saved from it, that evaluation is the answer, and a second pass over the sets is only time."""
    if trained.best_losses is not None and trained.weights_digest == weights_digest(trained.model_dir):
        run_logger().info(
            "stage %d: validation reuses the in-training evaluation of step %s (weights unchanged)",
            trained.stage,
            trained.best_step,
        )
        return trained.best_losses
    return evaluate(trained.model_dir, base_dir, sft_path, config.validation.batch_size)


@task(name="baseline", retries=2, retry_delay_seconds=[2, 10])
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
