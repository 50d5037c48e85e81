"""Validation and the gate: domain and general validation loss of a saved model, measured against the
base model's, and the decision to go on or to stop because general ability is being forgotten."""

from __future__ import annotations

import pandas as pd
import torch
from peft import PeftModel
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixtune.config import PipelineConfig
from mixtune.logs import run_logger
from tasks import tracking
from tasks.lm import PadCollator, mean_token_loss
from tasks.mix import StageMix
from tasks.train import StageTraining, is_adapter, validation_sets


class Losses(BaseModel):
    domain: float
    general: float


class GateDecision(BaseModel):
    decision: str  # "continue" or "stop"
    general_drift: float  # relative change of general val loss against the base model
    reason: str


class StageReport(BaseModel):
    stage: int
    target_share: float
    realised_share: float
    losses: Losses
    gate: GateDecision
    steps: int
    best_step: int | None
    stopped_early: bool
    tokens_per_second: float
    model_dir: str
    run_id: str


def gate(general_loss: float, base_general_loss: float, budget: float) -> GateDecision:
    drift = general_loss / base_general_loss - 1.0
    if drift > budget:
        return GateDecision(decision="stop", general_drift=drift, reason=(
            f"general val loss {general_loss:.4f} is {drift:+.1%} against the base model's "
            f"{base_general_loss:.4f}, beyond the forgetting budget of {budget:.0%}"))
    return GateDecision(decision="continue", general_drift=drift, reason=(
        f"general val loss drift {drift:+.1%} is within the forgetting budget of {budget:.0%}"))


def load_model(model_dir: str, base_dir: str):
    """A stage's output: a full model folder, or an adapter folder applied to the base model."""
    if is_adapter(model_dir):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir)


def evaluate(model_dir: str, base_dir: str, sft_path: str, batch_size: int) -> Losses:
    model = load_model(model_dir, base_dir)
    if torch.cuda.is_available():
        model = model.to("cuda")
    collator = PadCollator(AutoTokenizer.from_pretrained(base_dir).pad_token_id)
    sets = validation_sets(pd.read_parquet(sft_path))
    return Losses(**{tag: mean_token_loss(model, data, collator, batch_size) for tag, data in sets.items()})


def stage_report(config: PipelineConfig, mix: StageMix, trained: StageTraining, losses: Losses,
                 baseline: Losses) -> StageReport:
    return StageReport(
        stage=mix.stage, target_share=mix.target_share, realised_share=mix.realised_share, losses=losses,
        gate=gate(losses.general, baseline.general, config.validation.forgetting_budget),
        steps=trained.global_step, best_step=trained.best_step, stopped_early=trained.stopped_early,
        tokens_per_second=trained.tokens_per_second, model_dir=trained.model_dir, run_id=trained.run_id,
    )


def record(config: PipelineConfig, report: StageReport, mix: StageMix) -> None:
    """The stage's nested run gets its decision, its mix manifest and its model; then it is finished."""
    uri, run_id = tracking.tracking_uri(config), report.run_id
    tracking.log_metrics(uri, run_id, {"general_drift": report.gate.general_drift}, step=report.steps)
    tracking.set_tags(uri, run_id, {"mixtune.decision": report.gate.decision,
                                    "mixtune.decision_reason": report.gate.reason})
    tracking.log_artifacts(uri, run_id, mix.manifest, "mix")
    if config.tracking.log_models:
        tracking.log_artifacts(uri, run_id, report.model_dir, "adapter" if is_adapter(report.model_dir) else "model")
    tracking.end_run(uri, run_id)


def report_row(report: StageReport) -> dict:
    return {
        "stage": report.stage, "target share": f"{report.target_share:.3f}",
        "realised share": f"{report.realised_share:.3f}", "domain val loss": f"{report.losses.domain:.4f}",
        "general val loss": f"{report.losses.general:.4f}", "general drift": f"{report.gate.general_drift:+.1%}",
        "steps": report.steps, "best step": report.best_step, "decision": report.gate.decision,
        "reason": report.gate.reason,
    }


@task(name="baseline", retries=2, retry_delay_seconds=[2, 10])
def baseline_task(config: PipelineConfig, base_dir: str, sft_path: str, parent_run_id: str) -> Losses:
    losses = evaluate(base_dir, base_dir, sft_path, config.validation.batch_size)
    tracking.log_metrics(tracking.tracking_uri(config), parent_run_id,
                         {"base_domain_val_loss": losses.domain, "base_general_val_loss": losses.general}, step=0)
    run_logger().info("base model: domain val loss %.4f, general val loss %.4f", losses.domain, losses.general)
    return losses


@task(name="validate", retries=2, retry_delay_seconds=[2, 10])
def validate_task(config: PipelineConfig, trained: StageTraining, sft_path: str, base_dir: str) -> Losses:
    """The stage's best model, reloaded from disk, on the domain and the general validation sets."""
    losses = evaluate(trained.model_dir, base_dir, sft_path, config.validation.batch_size)
    tracking.log_metrics(tracking.tracking_uri(config), trained.run_id, {
        "final_domain_val_loss": losses.domain, "final_general_val_loss": losses.general,
        "stage_tokens_per_second": trained.tokens_per_second}, step=trained.global_step)
    run_logger().info("stage %d: domain val loss %.4f, general val loss %.4f", trained.stage, losses.domain,
                      losses.general)
    return losses


@task(name="gate", retries=2, retry_delay_seconds=[2, 10])
def gate_task(config: PipelineConfig, mix: StageMix, trained: StageTraining, losses: Losses,
              baseline: Losses) -> StageReport:
    report = stage_report(config, mix, trained, losses, baseline)
    record(config, report, mix)
    run_logger().info("stage %d gate: %s (%s)", report.stage, report.gate.decision, report.gate.reason)
    create_table_artifact([report_row(report)], key=f"stage-{report.stage}",
                          description=f"Stage {report.stage}: target vs realised domain share, losses, decision")
    return report
