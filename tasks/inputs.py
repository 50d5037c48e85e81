"""Retraining's first question: did the inputs change? A run whose data and recipe hash like the last
successful training run's (or the champion's) ends without training, and says which run it matches."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mixtune.core.cache import fingerprint
from mixtune.core.config import PipelineConfig
from tasks.keys import ingest_key
from tasks.records import Verdict
from tasks.registry import champion_version
from tasks.tracking import INPUT_HASH_TAG, Tracker
from tasks.verdicts import VERDICT_TAG, record_verdict

MODEL_TAG = "mixtune.registered_model"
RECIPE_SECTIONS = {"model", "pretrain", "schedule", "train", "validation", "plan", "goal", "advisor"}


def input_hash(config: PipelineConfig) -> str:
    """Data content and the training recipe: a UI run with a changed learning rate is new input too."""
    recipe = config.model_dump(mode="json", include=RECIPE_SECTIONS)
    origin = None
    if config.model.path:
        # Names, sizes and mtimes: hashing a 200M-parameter model's weights every tick costs more than it tells.
        origin = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(config.model.path).iterdir())
    return fingerprint(ingest_key(config), recipe, origin, config.run.seed)


def last_trained(tracker: Tracker, model_name: str):
    """The newest run of this registered model that finished and trained (a skip trained nothing)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{MODEL_TAG}` = '{model_name}' and attributes.status = 'FINISHED' "
        f"and tags.`{VERDICT_TAG}` != 'skip'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def unchanged_since(config: PipelineConfig, tracker: Tracker) -> str | None:
    """A successful run with the same inputs: the last one that trained, or the champion's. The champion counts
    too, so a manual experiment in between (rejected or not) does not make the next scheduled tick retrain
    what made the champion. This run is tagged with its hash either way."""
    digest = input_hash(config)
    tracker.set_tags({INPUT_HASH_TAG: digest, MODEL_TAG: config.registered_model})
    if not config.registry.skip_unchanged:
        return None
    holder = champion_version(tracker, config.registered_model, config.registry.alias)
    candidates = [
        last_trained(tracker, config.registered_model),
        tracker.client.get_run(holder.run_id) if holder else None,
    ]
    return next((run.info.run_id for run in candidates if run and run.data.tags.get(INPUT_HASH_TAG) == digest), None)


def skip(config: PipelineConfig, tracker: Tracker, previous_run: str) -> Verdict:
    holder = champion_version(tracker, config.registered_model, config.registry.alias)
    return Verdict(
        decision="skip",
        reason=f"no new data: the inputs hash as those of run {previous_run}",
        model_name=config.registered_model,
        alias=config.registry.alias,
        champion_version=int(holder.version) if holder else None,
        previous_run=previous_run,
    )


@task(name="check-inputs", retries=2, retry_delay_seconds=[2, 5])
def unchanged_task(config: PipelineConfig, tracker: Tracker) -> str | None:
    return unchanged_since(config, tracker)


@task(name="skip", retries=2, retry_delay_seconds=[2, 5])
def skip_task(config: PipelineConfig, tracker: Tracker, previous_run: str) -> Verdict:
    verdict = skip(config, tracker, previous_run)
    record_verdict(tracker, verdict)
    return verdict
