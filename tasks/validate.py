"""Validation and the gate: domain and general validation loss of a saved model, measured against the
base model's, and the decision to go on or to stop because general ability is being forgotten."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel
from prefect import task
from prefect.artifacts import create_image_artifact, create_table_artifact
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixtune.config import PipelineConfig
from mixtune.logs import run_logger
from tasks import tracking
from tasks.lm import PadCollator, mean_token_loss
from tasks.guard import GateDecision, ShareCursor, gate
from tasks.mix import StageMix
from tasks.plots import COLOURS, StageCurves, data_uri, loss_plot
from tasks.train import StageTraining, is_adapter, validation_sets


class Losses(BaseModel):
    domain: float
    general: float


class StageReport(BaseModel):
    stage: int
    target_share: float
    realised_share: float
    source_epochs: dict[str, float]
    losses: Losses
    gate: GateDecision
    steps: int
    best_step: int | None
    stopped_early: bool
    stop_reason: str | None
    tokens_per_second: float
    model_dir: str
    run_id: str


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
    sets = validation_sets(sft_path)
    return Losses(**{tag: mean_token_loss(model, data, collator, batch_size) for tag, data in sets.items()})


def probe_prompts(sft_path: str, samples_path: str, per_set: int) -> list[dict]:
    """Fixed probes: the first validation samples of each set by id, the same for every stage and re-run."""
    val = pd.read_parquet(sft_path, columns=["sample_id", "tag"], filters=[("split", "==", "val")])
    val = val.sort_values("sample_id")
    chosen = pd.concat([group.head(per_set) for _, group in val.groupby("tag")])
    texts = pd.read_parquet(samples_path, columns=["sample_id", "messages"],
                            filters=[("sample_id", "in", chosen["sample_id"].tolist())]).drop_duplicates("sample_id")
    merged = chosen.merge(texts, on="sample_id")
    probes = []
    for tag, messages in zip(merged["tag"], merged["messages"]):
        turns = json.loads(messages)
        probes.append({"set": tag, "prompt": turns[:-1], "reference": turns[-1]["content"]})
    return probes


@torch.no_grad()
def answer_probes(model_dir: str, base_dir: str, probes: list[dict], max_new_tokens: int = 48) -> list[dict]:
    model, tokenizer = load_model(model_dir, base_dir), AutoTokenizer.from_pretrained(base_dir)
    model.eval()
    answers = []
    for probe in probes:
        ids = tokenizer.apply_chat_template(probe["prompt"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        answers.append({**probe, "answer": answer})
    return answers


def format_probes(stage: int, answers: list[dict]) -> str:
    lines = [f"# Stage {stage}: probe answers", ""]
    for a in answers:
        lines += [f"## {a['set']}: {a['prompt'][-1]['content']}", f"- reference: {a['reference']}",
                  f"- model: {a['answer']}", ""]
    return "\n".join(lines)


def stage_report(config: PipelineConfig, mix: StageMix, trained: StageTraining, losses: Losses,
                 baseline: Losses, cursor: ShareCursor) -> StageReport:
    v = config.validation
    return StageReport(
        stage=mix.stage, target_share=mix.target_share, realised_share=mix.realised_share,
        source_epochs=mix.source_epochs, losses=losses,
        gate=gate(losses.general, baseline.general, v.forgetting_budget, v.on_forgetting, cursor.actions,
                  v.max_guard_actions),
        steps=trained.global_step, best_step=trained.best_step, stopped_early=trained.stopped_early,
        stop_reason=trained.stop_reason,
        tokens_per_second=trained.tokens_per_second, model_dir=trained.model_dir, run_id=trained.run_id,
    )


def stage_curves(uri: str, report: StageReport) -> StageCurves:
    return StageCurves(stage=report.stage, steps=report.steps, decision=report.gate.decision,
                       target_share=report.target_share, realised_share=report.realised_share,
                       curves=tracking.metric_curves(uri, report.run_id, list(COLOURS)))


def record(config: PipelineConfig, report: StageReport, mix: StageMix, baseline: Losses) -> Path:
    """The stage's nested run gets its decision, loss curves, mix manifest and model; then it is finished."""
    uri, run_id = tracking.tracking_uri(config), report.run_id
    plot = loss_plot([stage_curves(uri, report)], baseline.model_dump(), config.validation.forgetting_budget,
                     Path(report.model_dir).parent / "loss_curves.png")
    tracking.log_artifacts(uri, run_id, plot)
    tracking.log_metrics(uri, run_id, {"general_drift": report.gate.general_drift}, step=report.steps)
    tracking.set_tags(uri, run_id, {"mixtune.decision": report.gate.decision,
                                    "mixtune.decision_reason": report.gate.reason})
    tracking.log_artifacts(uri, run_id, mix.manifest, "mix")
    if config.tracking.log_models:
        tracking.log_artifacts(uri, run_id, report.model_dir, "adapter" if is_adapter(report.model_dir) else "model")
    tracking.end_run(uri, run_id)
    return plot


def report_row(report: StageReport) -> dict:
    return {
        "stage": report.stage, "target share": f"{report.target_share:.3f}",
        "realised share": f"{report.realised_share:.3f}", "domain val loss": f"{report.losses.domain:.4f}",
        "general val loss": f"{report.losses.general:.4f}", "general drift": f"{report.gate.general_drift:+.1%}",
        "steps": report.steps, "best step": report.best_step, "stopped early": report.stop_reason or "",
        "decision": report.gate.decision,
        "reason": report.gate.reason,
    }


@task(name="baseline", retries=2, retry_delay_seconds=[2, 10])
def baseline_task(config: PipelineConfig, base_dir: str, sft_path: str, probes: list[dict],
                  parent_run_id: str) -> Losses:
    uri = tracking.tracking_uri(config)
    losses = evaluate(base_dir, base_dir, sft_path, config.validation.batch_size)
    tracking.log_metrics(uri, parent_run_id,
                         {"base_domain_val_loss": losses.domain, "base_general_val_loss": losses.general}, step=0)
    text = format_probes(0, answer_probes(base_dir, base_dir, probes)).replace("Stage 0", "Base model")
    tracking.log_text(uri, parent_run_id, text, "probes/stage-0-base.md")
    run_logger().info("base model: domain val loss %.4f, general val loss %.4f", losses.domain, losses.general)
    return losses


@task(name="validate", retries=2, retry_delay_seconds=[2, 10])
def validate_task(config: PipelineConfig, trained: StageTraining, sft_path: str, base_dir: str,
                  probes: list[dict], parent_run_id: str) -> Losses:
    """The stage's best model, reloaded from disk, on the domain and the general validation sets; and its
    answers to the fixed probe prompts, so a person can read how answers change from stage to stage."""
    uri = tracking.tracking_uri(config)
    losses = evaluate(trained.model_dir, base_dir, sft_path, config.validation.batch_size)
    tracking.log_metrics(uri, trained.run_id, {
        "final_domain_val_loss": losses.domain, "final_general_val_loss": losses.general,
        "stage_tokens_per_second": trained.tokens_per_second}, step=trained.global_step)
    text = format_probes(trained.stage, answer_probes(trained.model_dir, base_dir, probes))
    tracking.log_text(uri, trained.run_id, text, "probes.md")
    tracking.log_text(uri, parent_run_id, text, f"probes/stage-{trained.stage}.md")
    run_logger().info("stage %d: domain val loss %.4f, general val loss %.4f", trained.stage, losses.domain,
                      losses.general)
    return losses


@task(name="gate", retries=2, retry_delay_seconds=[2, 10])
def gate_task(config: PipelineConfig, mix: StageMix, trained: StageTraining, losses: Losses,
              baseline: Losses, cursor: ShareCursor) -> StageReport:
    report = stage_report(config, mix, trained, losses, baseline, cursor)
    plot = record(config, report, mix, baseline)
    create_image_artifact(data_uri(plot), key=f"stage-{report.stage}-loss-curves",
                          description=f"Stage {report.stage}: loss curves against the base model's")
    run_logger().info("stage %d gate: %s (%s)", report.stage, report.gate.decision, report.gate.reason)
    create_table_artifact([report_row(report)], key=f"stage-{report.stage}",
                          description=f"Stage {report.stage}: target vs realised domain share, losses, decision")
    return report
