"""The challenge: the run's final model (the challenger) meets the registered champion on this run's
validation sets, in nats per byte (tasks/scoring.py), and the registry alias moves only to a model that is
better on domain data and within the forgetting budget on general data."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from tasks.mlflow_names import MlflowTag, Tag
from tasks.models import is_adapter, standalone_model
from tasks.records import ByteLosses, Decision, TokenLosses, Verdict
from tasks.registry import alias_lock, champion_version, fetch_version, model_for, register_version
from tasks.requests import RunRequest
from tasks.scoring import nats_per_byte, per_byte
from tasks.tables import domain_val_digest
from tasks.tracking import Tracker
from tasks.verdicts import record_verdict


def decide(
    challenger: ByteLosses, champion: ByteLosses | None, budget: float, min_improvement: float
) -> tuple[Decision, str]:
    if champion is None:
        return "first", "no champion yet: the first trained model becomes it"
    change = (challenger.domain - champion.domain) / champion.domain
    drift = (challenger.general - champion.general) / champion.general
    numbers = f"domain loss {change:+.2%}, general loss {drift:+.2%} against the champion"
    if -change <= min_improvement:
        needed = f"more than {min_improvement:.2%} lower" if min_improvement else "lower"
        return "reject", f"{numbers}: domain loss not {needed}"
    if drift > budget:
        return "reject", f"{numbers}: general loss beyond the {budget:.0%} forgetting budget"
    return "promote", f"{numbers}: within the {budget:.0%} forgetting budget"


def version_description(tracker: Tracker, decision: Decision, reason: str, challenger: ByteLosses) -> str:
    """What tells versions apart in the registry: which run, how it trained, on what data, and why it won or lost."""
    tags = tracker.tags()
    alpha = tags.get(Tag.INTERPOLATION_ALPHA)
    interpolated = f", interpolated toward the base at alpha {alpha}" if alpha else ""
    return (
        f"{tags.get(MlflowTag.RUN_NAME, tracker.parent_run_id)}: {tags.get(Tag.METHOD, '?')} SFT, "
        f"schedule {tags.get(Tag.SCHEDULE) or '-'} (final stage {tags.get(Tag.FINAL_STAGE, '?')}"
        f"{interpolated}), "
        f"inputs {tags.get(Tag.INPUT_HASH, '?')[:12]}. Decision {decision}: {reason}. "
        f"Challenger nats/byte: domain {challenger.domain:.4f}, general {challenger.general:.4f}."
    )


def current_champion(config: PipelineConfig, tracker: Tracker, sft_path: str) -> str | None:
    """The files of the model that holds the alias now for this run's domain validation set, or None when
    there is no such champion yet."""
    _, holder = model_for(tracker, config.registered_model, config.registry.alias, domain_val_digest(sft_path))
    return fetch_version(tracker, holder, config.run.output_dir) if holder else None


def challenge(request: RunRequest, final_model: str, final_losses: TokenLosses, champion_sft: str | None) -> Verdict:
    """Challenger vs champion on the same validation conversations (`champion_sft`: tokenized the champion's
    way); the alias moves only on first/promote. The challenger's per-token losses on these sets were measured
    when it was validated: only rescaled here. The alias does not move here: see crown_task."""
    config, tracker, sft_path = request.config, request.tracker, request.sft_path
    alias, domain_val = config.registry.alias, domain_val_digest(sft_path)
    name, holder = model_for(tracker, config.registered_model, alias, domain_val)
    merged = Path(tracker.run_folder) / "merged_model"
    challenger_dir = standalone_model(final_model, request.base_dir, merged)
    challenger = per_byte(final_losses, sft_path, challenger_dir)
    champion = None
    if holder and champion_sft:
        champion_dir = fetch_version(tracker, holder, config.run.output_dir)
        champion = nats_per_byte(champion_dir, champion_sft, config.validation.batch_size)
    decision, reason = decide(
        challenger, champion, config.validation.forgetting_budget, config.registry.min_improvement
    )
    artifact_path = "merged_model" if is_adapter(final_model) else "final_model"
    version = register_version(
        tracker,
        name,
        challenger_dir,
        artifact_path,
        {
            Tag.DECISION: decision,
            Tag.CHALLENGER_DOMAIN: challenger.domain,
            Tag.CHALLENGER_GENERAL: challenger.general,
            Tag.RUN_NAME: tracker.tags().get(MlflowTag.RUN_NAME, ""),
            Tag.PREFECT_FLOW_RUN_URL: tracker.tags().get(Tag.PREFECT_FLOW_RUN_URL, ""),
            Tag.DOMAIN_VAL_DIGEST: domain_val,
        },
        version_description(tracker, decision, reason, challenger),
    )
    return Verdict(
        decision=decision,
        reason=reason,
        model_name=name,
        alias=alias,
        version=version,
        champion_version=version if decision != "reject" else int(holder.version),
        challenged=int(holder.version) if champion else None,
        challenger=challenger,
        champion=champion,
    )


def crown(config: PipelineConfig, tracker: Tracker, verdict: Verdict) -> bool:
    """Moves the alias on first/promote and records the verdict, if the decision still stands: the alias is read
    again right before it moves (under a lock shared by this host's runs). If another run of the pipeline moved
    it since the challenge read it, nothing moves or is recorded, and False says: challenge the new champion."""
    with alias_lock(config.run.output_dir, tracker.uri, verdict.model_name):
        holder = champion_version(tracker, verdict.model_name, verdict.alias)
        now = int(holder.version) if holder else None
        if now not in (verdict.challenged, verdict.version):  # its own version: moved before a retry of this task
            run_logger().warning(
                "%s@%s moved to version %s while this run challenged %s: deciding again against it",
                verdict.model_name,
                verdict.alias,
                now,
                verdict.challenged or "no champion",
            )
            return False
        if verdict.decision in ("first", "promote"):
            tracker.move_alias(verdict.model_name, verdict.alias, verdict.version)
    record_verdict(tracker, verdict)
    return True


# The flow calls it after the parent run has ended FINISHED: a run killed before that never holds the champion.
@task(name="crown", task_run_name="crown", retries=2, retry_delay_seconds=[2, 10])
def crown_task(config: PipelineConfig, tracker: Tracker, verdict: Verdict) -> bool:
    return crown(config, tracker, verdict)


@task(name="champion", task_run_name="champion", retries=2, retry_delay_seconds=[2, 10])
def champion_task(config: PipelineConfig, tracker: Tracker, sft_path: str) -> str | None:
    return current_champion(config, tracker, sft_path)


@task(name="challenge", task_run_name="challenge")
def challenge_task(
    request: RunRequest, final_model: str, final_losses: TokenLosses, champion_sft: str | None
) -> Verdict:
    return challenge(request, final_model, final_losses, champion_sft)


def base_delivered(config: PipelineConfig, tracker: Tracker, sft_path: str) -> Verdict:
    """No stage passed the gate: the run's model is the base it started from, no challenger. It is never
    registered, so the registry holds fine-tuned models only, and the alias stays where it is."""
    name, holder = model_for(tracker, config.registered_model, config.registry.alias, domain_val_digest(sft_path))
    champion = f"the champion is unchanged (version {holder.version})" if holder else "there is still no champion"
    return Verdict(
        decision="no_trained_model",
        reason=f"base delivered: no stage passed the forgetting gate; nothing registered, {champion}",
        model_name=name,
        alias=config.registry.alias,
        champion_version=int(holder.version) if holder else None,
    )


@task(name="no-challenger", task_run_name="no challenger (base delivered)", retries=2, retry_delay_seconds=[2, 10])
def base_delivered_task(config: PipelineConfig, tracker: Tracker, sft_path: str) -> Verdict:
    verdict = base_delivered(config, tracker, sft_path)
    record_verdict(tracker, verdict)
    return verdict
