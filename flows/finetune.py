"""The `finetune` flow: the pipeline, in order. Each call is one retryable Prefect task that passes paths."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from mixtune.config import PipelineConfig
from mixtune.paths import run_dir
from tasks.base_model import pretrain_task, tokenizer_task
from tasks.guard import ShareCursor
from tasks.ingest import ingest_task
from tasks.mix import mix_task, stage_shares
from tasks.plan import plan_task
from tasks.data_report import data_report_task
from tasks.report import RunSummary, register_task
from tasks.tokenize import tokenize_task
from tasks.tracking import end_open_runs, start_tracking_task, tracking_uri
from tasks.train import train_task
from tasks.validate import baseline_task, gate_task, probe_prompts, validate_task

PROBES_PER_SET = 3


@flow(name="finetune")
def finetune(config: PipelineConfig) -> RunSummary:
    """Ingest, plan, pre-train a scratch model, then per stage: mix domain into general data, train,
    validate on domain and general data, and let the gate continue, hold, back off or stop."""
    parent = start_tracking_task(config, flow_run.id)
    try:
        return run_pipeline(config, parent)
    except BaseException:
        end_open_runs(tracking_uri(config), parent, "FAILED")
        raise


def run_pipeline(config: PipelineConfig, parent: str) -> RunSummary:
    data = ingest_task(config)
    config = plan_task(config, data.stats, parent).config
    tokenizer_dir = tokenizer_task(config, data.samples, data.key)
    tokens = tokenize_task(data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir,
                           config.data.overlong)
    data_report_task(config, parent, data, tokens)
    base = pretrain_task(config, tokenizer_dir, tokens.pretrain, tokens.key)
    probes = probe_prompts(tokens.sft, data.samples, PROBES_PER_SET)
    baseline = baseline_task(config, base, tokens.sft, probes, parent)

    stages_dir = run_dir(config.run.output_dir, config.run.name, flow_run.id)
    cursor, model, reports = ShareCursor(shares=stage_shares(config.schedule)), base, []
    while cursor.share is not None:
        folder = stages_dir / f"stage-{cursor.stage}"
        mix = mix_task(tokens.sft, cursor.stage, cursor.share, config.schedule.samples_per_stage, config.run.seed,
                       str(folder / "mix.parquet"), config.train.epochs)
        trained = train_task(config, mix, tokens.sft, model, base, str(folder), parent)
        losses = validate_task(config, trained, tokens.sft, base, probes, parent)
        report = gate_task(config, mix, trained, losses, baseline, cursor)
        reports.append(report)
        cursor, model = cursor.after(report.gate.decision), trained.model_dir
    return register_task(config, parent, reports, baseline, base)
