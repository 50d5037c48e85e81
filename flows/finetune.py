"""The `finetune` flow: the pipeline, in order. Each call is one retryable Prefect task that passes paths."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from mixtune.config import PipelineConfig
from mixtune.paths import run_dir
from tasks.base_model import pretrain_task, tokenizer_task
from tasks.ingest import ingest_task
from tasks.mix import mix_task, stage_shares
from tasks.report import RunSummary, data_report_task, register_task
from tasks.tokenize import tokenize_task
from tasks.tracking import end_open_runs, start_tracking_task, tracking_uri
from tasks.train import train_task
from tasks.validate import baseline_task, gate_task, validate_task


@flow(name="finetune")
def finetune(config: PipelineConfig) -> RunSummary:
    """Ingest, pre-train a scratch model, then per stage: mix domain into general data, train, validate, gate."""
    parent = start_tracking_task(config, flow_run.id)
    try:
        return run_stages(config, parent)
    except BaseException:
        end_open_runs(tracking_uri(config), parent, "FAILED")
        raise


def run_stages(config: PipelineConfig, parent: str) -> RunSummary:
    data = ingest_task(config)
    tokenizer_dir = tokenizer_task(config, data.samples, data.key)
    tokens = tokenize_task(data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir)
    data_report_task(config, parent, data, tokens)
    base = pretrain_task(config, tokenizer_dir, tokens.pretrain, tokens.key)
    baseline = baseline_task(config, base, tokens.sft, parent)

    stages_dir = run_dir(config.run.output_dir, config.run.name, flow_run.id)
    model, reports = base, []
    for stage, share in enumerate(stage_shares(config.schedule), start=1):
        folder = Path(stages_dir) / f"stage-{stage}"
        mix = mix_task(tokens.sft, stage, share, config.schedule.samples_per_stage, config.run.seed,
                       str(folder / "mix.parquet"))
        trained = train_task(config, mix, tokens.sft, model, base, str(folder), parent)
        losses = validate_task(config, trained, tokens.sft, base)
        report = gate_task(config, mix, trained, losses, baseline)
        reports.append(report)
        if report.gate.decision == "stop":
            break
        model = trained.model_dir
    return register_task(config, parent, reports, baseline)
