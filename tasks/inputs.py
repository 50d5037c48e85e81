"""Retraining's first question: did the inputs change? A run whose data and recipe hash like the last
successful training run's (or the champion's) ends without training, and counts itself on the run it matches."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mixtune.core.cache import fingerprint
from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from tasks import artifacts
from tasks.keys import distill_inputs, ingest_key, rehearsal_inputs
from tasks.mlflow_names import Metric, Tag
from tasks.records import Verdict
from tasks.registry import champion_version
from tasks.tracking import Experiment, Tracker, open_experiment
from tasks.verdicts import verdict_markdown

# A run whose every stage breached the gate still counts: the same seeded inputs would breach the same way.
UNTRAINED_AGAIN = (
    "no stage passed the forgetting gate and these inputs would train the same way again; change the data or "
    "the recipe (a lower learning rate, a lower domain share), or set registry.skip_unchanged=false"
)
RECIPE_SECTIONS = {"model", "pretrain", "schedule", "train", "validation", "plan", "goal", "advisor"}


def training_recipe(config: PipelineConfig) -> dict:
    """The recipe sections as hashed; validation.interpolate only when on, so that runs recorded before it
    existed still hash alike and a scheduled tick does not retrain them for a field they never had."""
    unset = {"validation": {"interpolate"}} if config.validation.interpolate == "off" else None
    return config.model_dump(mode="json", include=RECIPE_SECTIONS, exclude=unset)


def input_hash(config: PipelineConfig) -> str:
    """Data content and the training recipe: a UI run with a changed learning rate is new input too."""
    recipe = training_recipe(config)
    origin = None
    if config.model.path:
        # Names, sizes and mtimes: hashing a 200M-parameter model's weights every tick costs more than it tells.
        origin = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(config.model.path).iterdir())
    # absent when off: earlier runs' hashes still match
    extra = [made for made in (rehearsal_inputs(config), distill_inputs(config)) if made]
    return fingerprint(ingest_key(config), recipe, origin, config.run.seed, *extra)


def input_tags(config: PipelineConfig, digest: str) -> dict[str, str]:
    """Set on every training run's parent: what the next tick compares its inputs with."""
    return {Tag.INPUT_HASH: digest, Tag.REGISTERED_MODEL: config.registered_model}


def unchanged_since(config: PipelineConfig, experiment: Experiment, digest: str) -> str | None:
    """A successful run with the same inputs: the last one that trained, or the champion's. The champion counts
    too, so a manual experiment in between (rejected or not) does not make the next scheduled tick retrain
    what made the champion."""
    if not config.registry.skip_unchanged:
        return None
    holder = champion_version(experiment, config.registered_model, config.registry.alias)
    candidates = [
        experiment.last_trained_run(config.registered_model),
        experiment.run(holder.run_id) if holder else None,
    ]
    return next(
        (
            run.info.run_id
            for run in candidates
            if run and run.info.status == "FINISHED" and run.data.tags.get(Tag.INPUT_HASH) == digest
        ),
        None,
    )


def skip(config: PipelineConfig, experiment: Experiment, previous_run: str) -> Verdict:
    holder = champion_version(experiment, config.registered_model, config.registry.alias)
    reason = f"no new data: the inputs hash as those of run {previous_run}"
    if experiment.run(previous_run).data.tags.get(Tag.VERDICT) == "no_trained_model":
        reason += f"; that run delivered its base model: {UNTRAINED_AGAIN}"
    return Verdict(
        decision="skip",
        reason=reason,
        model_name=config.registered_model,
        alias=config.registry.alias,
        champion_version=int(holder.version) if holder else None,
        previous_run=previous_run,
    )


def record_skip(experiment: Experiment, verdict: Verdict, flow_run_id: str | None) -> int:
    """A skip adds no run of its own (a daily cron would fill the run list with empty parents): the run whose
    inputs it matched counts it, as the `no_new_data_ticks` metric (one point per tick, timestamped) and the
    last tick's tags. Returns the tick count."""
    matched = Tracker(uri=experiment.uri, experiment_id=experiment.experiment_id, parent_run_id=verdict.previous_run)
    ticks = len(matched.metric_curves([Metric.NO_NEW_DATA_TICKS])[Metric.NO_NEW_DATA_TICKS]) + 1
    matched.log_metrics({Metric.NO_NEW_DATA_TICKS: ticks}, step=ticks)
    matched.set_tags({Tag.LAST_SKIP: flow_run_id or "mixtune run (no Prefect flow run)"})
    run_logger().info("retraining: skip (%s); tick %d recorded on run %s", verdict.reason, ticks, matched.run_id)
    return ticks


def skip_if_unchanged(config: PipelineConfig) -> Verdict | None:
    """The whole skip check without Prefect or torch, for `mixtune run` to answer a no-new-data tick fast."""
    experiment = open_experiment(config)
    previous = unchanged_since(config, experiment, input_hash(config))
    if previous is None:
        return None
    verdict = skip(config, experiment, previous)
    record_skip(experiment, verdict, None)
    return verdict


@task(name="check-inputs", task_run_name="check inputs", retries=2, retry_delay_seconds=[2, 5])
def unchanged_task(config: PipelineConfig, experiment: Experiment, digest: str) -> str | None:
    return unchanged_since(config, experiment, digest)


@task(name="skip", task_run_name="skip (no new data)", retries=2, retry_delay_seconds=[2, 5])
def skip_task(config: PipelineConfig, experiment: Experiment, previous_run: str, flow_run_id: str) -> Verdict:
    verdict = skip(config, experiment, previous_run)
    record_skip(experiment, verdict, flow_run_id)
    artifacts.markdown("retrain-verdict", verdict_markdown(verdict), "Retraining: skip")
    return verdict
