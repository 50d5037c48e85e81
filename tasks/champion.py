"""Retraining: a run whose inputs did not change ends without training; otherwise the run's final model
(the challenger) meets the registered champion on this run's validation sets, and the registry alias
moves only to a model that is better on domain data and within the forgetting budget on general data.

Champion and challenger may tokenize differently (a scratch tokenizer is trained on the data, and the data
changed), so they are compared in nats per byte of the target text: the same text whatever the tokenizer.
With one tokenizer this ranks exactly as the per-token loss does: both divide one total by a constant.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel
from transformers import AutoTokenizer

from mixtune.cache import fingerprint, is_complete, mark_complete
from mixtune.config import PipelineConfig
from mixtune.logs import run_logger
from mixtune.paths import cache_dir
from tasks import tracking
from tasks.ingest import IngestResult, ingest_key
from tasks.tokenize import IGNORE, tokenize
from tasks.train import is_adapter, validation_sets
from tasks.validate import Losses, evaluate, load_model

INPUT_HASH_TAG = "mixtune.input_hash"
MODEL_TAG = "mixtune.registered_model"
VERDICT_TAG = "mixtune.verdict"
RECIPE_SECTIONS = {"model", "pretrain", "schedule", "train", "validation", "plan", "goal", "advisor"}

Decision = Literal["skip", "first", "promote", "reject"]


class Verdict(BaseModel):
    decision: Decision
    reason: str
    model_name: str
    alias: str
    version: int | None = None  # the challenger's registry version
    champion_version: int | None = None  # who holds the alias after the decision
    challenger: Losses | None = None  # nats per byte of target text
    champion: Losses | None = None
    previous_run: str | None = None  # skip: the successful run whose inputs were the same


def input_hash(config: PipelineConfig) -> str:
    """Data content and the training recipe: a UI run with a changed learning rate is new input too."""
    recipe = config.model_dump(mode="json", include=RECIPE_SECTIONS)
    origin = None
    if config.model.path:
        # Names, sizes and mtimes: hashing a 200M-parameter model's weights every tick costs more than it tells.
        origin = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(config.model.path).iterdir())
    return fingerprint(ingest_key(config), recipe, origin, config.run.seed)


def last_trained(client: MlflowClient, experiment_id: str, model_name: str):
    """The newest run of this registered model that finished and trained (a skip trained nothing)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{MODEL_TAG}` = '{model_name}' and attributes.status = 'FINISHED' "
                                       f"and tags.`{VERDICT_TAG}` != 'skip'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def unchanged_since(config: PipelineConfig, parent_run_id: str) -> str | None:
    """A successful run with the same inputs: the last one that trained, or the champion's. The champion counts
    too, so a manual experiment in between (rejected or not) does not make the next scheduled tick retrain
    what made the champion. This run is tagged with its hash either way."""
    uri, digest = tracking.tracking_uri(config), input_hash(config)
    client = MlflowClient(uri)
    tracking.set_tags(uri, parent_run_id, {INPUT_HASH_TAG: digest, MODEL_TAG: config.registered_model})
    if not config.registry.skip_unchanged:
        return None
    holder = champion_version(client, config.registered_model, config.registry.alias)
    candidates = [last_trained(client, client.get_run(parent_run_id).info.experiment_id, config.registered_model),
                  client.get_run(holder.run_id) if holder else None]
    return next((run.info.run_id for run in candidates if run and run.data.tags.get(INPUT_HASH_TAG) == digest), None)


def decide(challenger: Losses, champion: Losses | None, budget: float,
           min_improvement: float) -> tuple[Decision, str]:
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


def target_counts(sft_path: str, tokenizer_dir: str) -> dict[str, tuple[int, int]]:
    """Per validation set: scored tokens (as mean_token_loss counts them) and the UTF-8 bytes they spell."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = {}
    for tag, dataset in validation_sets(sft_path).items():
        targets = [[t for t in labels[1:] if t != IGNORE] for labels in dataset.labels]
        n_bytes = sum(len(tokenizer.decode(ids).encode("utf-8")) for ids in targets)
        counts[tag] = (sum(map(len, targets)), max(n_bytes, 1))
    return counts


def per_byte(per_token: Losses, sft_path: str, tokenizer_dir: str) -> Losses:
    counts = target_counts(sft_path, tokenizer_dir)
    return Losses(**{tag: getattr(per_token, tag) * tokens / n_bytes for tag, (tokens, n_bytes) in counts.items()})


def nats_per_byte(model_dir: str, sft_path: str, batch_size: int) -> Losses:
    return per_byte(evaluate(model_dir, model_dir, sft_path, batch_size), sft_path, model_dir)


def standalone_model(final_dir: str, base_dir: str, folder: Path) -> str:
    """What gets registered must load on its own: a LoRA adapter is merged into its base first."""
    if not is_adapter(final_dir):
        return final_dir
    if not is_complete(folder):
        load_model(final_dir, base_dir).merge_and_unload().save_pretrained(folder)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
        mark_complete(folder)
    return str(folder)


def champion_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def fetch_version(client: MlflowClient, version, output_dir: str) -> str:
    """The champion's files, downloaded once per version."""
    folder = cache_dir(output_dir, "champion", fingerprint(version.name, version.version, version.run_id))
    artifact = version.tags.get("mixtune.artifact_path", "final_model")
    if not is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        client.download_artifacts(version.run_id, artifact, str(folder))
        mark_complete(folder)
    return str(folder / artifact)


def champion_losses(config: PipelineConfig, data: IngestResult, champion_dir: str) -> Losses:
    """The champion on this run's validation conversations, tokenized its own way."""
    tokens = tokenize(data.samples, data.key, champion_dir, config.model.max_seq_len, config.run.output_dir,
                      config.data.overlong)
    return nats_per_byte(champion_dir, tokens.sft, config.validation.batch_size)


def register_version(client: MlflowClient, name: str, run_id: str, model_dir: str, artifact_path: str,
                     verdict: dict) -> int:
    if artifact_path != "final_model":
        client.log_artifacts(run_id, model_dir, artifact_path)
    try:
        client.create_registered_model(name, description="mixtune champions: fine-tuned causal LMs (HF folders)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"mixtune.artifact_path": artifact_path, **{f"mixtune.{k}": str(v) for k, v in verdict.items()}}
    return int(client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags).version)


def challenge(config: PipelineConfig, parent_run_id: str, final_model: str, final_losses: Losses, base_dir: str,
              sft_path: str, data: IngestResult, work_dir: Path) -> Verdict:
    """Challenger vs champion on the same validation conversations; the alias moves only on first/promote.
    The challenger's per-token losses on these sets were measured when it was validated: only rescaled here."""
    uri, name, alias = tracking.tracking_uri(config), config.registered_model, config.registry.alias
    client = MlflowClient(uri)
    challenger_dir = standalone_model(final_model, base_dir, work_dir / "merged_model")
    challenger = per_byte(final_losses, sft_path, challenger_dir)
    holder = champion_version(client, name, alias)
    champion = champion_losses(config, data, fetch_version(client, holder, config.run.output_dir)) if holder else None
    decision, reason = decide(challenger, champion, config.validation.forgetting_budget,
                              config.registry.min_improvement)
    artifact_path = "merged_model" if is_adapter(final_model) else "final_model"
    version = register_version(client, name, parent_run_id, challenger_dir, artifact_path,
                               {"decision": decision, "challenger_domain": challenger.domain,
                                "challenger_general": challenger.general})
    if decision in ("first", "promote"):
        client.set_registered_model_alias(name, alias, version)
    return Verdict(decision=decision, reason=reason, model_name=name, alias=alias, version=version,
                   champion_version=version if decision != "reject" else int(holder.version),
                   challenger=challenger, champion=champion)


def skip(config: PipelineConfig, previous_run: str) -> Verdict:
    holder = champion_version(MlflowClient(tracking.tracking_uri(config)), config.registered_model,
                              config.registry.alias)
    return Verdict(decision="skip", reason=f"no new data: the inputs hash as those of run {previous_run}",
                   model_name=config.registered_model, alias=config.registry.alias,
                   champion_version=int(holder.version) if holder else None, previous_run=previous_run)


def verdict_markdown(verdict: Verdict) -> str:
    lines = [f"# Retraining decision: **{verdict.decision}**", "", verdict.reason, "",
             f"Registered model `{verdict.model_name}`: alias `{verdict.alias}` is on version "
             f"{verdict.champion_version or '(none)'}" + (f"; this run's model is version {verdict.version}"
                                                          if verdict.version else ""), ""]
    if verdict.challenger:
        lines += ["| nats per byte | challenger | champion |", "|---|---|---|"]
        for tag in ("domain", "general"):
            champion = f"{getattr(verdict.champion, tag):.4f}" if verdict.champion else "-"
            lines.append(f"| {tag} val | {getattr(verdict.challenger, tag):.4f} | {champion} |")
    return "\n".join(lines) + "\n"


def record_verdict(config: PipelineConfig, parent_run_id: str, verdict: Verdict) -> None:
    """In MLflow (tags, metrics, a markdown file) and in Prefect (an artifact); then the parent run ends."""
    uri = tracking.tracking_uri(config)
    tracking.set_tags(uri, parent_run_id, {VERDICT_TAG: verdict.decision, "mixtune.verdict_reason": verdict.reason,
                                           "mixtune.model_version": verdict.version or "",
                                           "mixtune.champion_version": verdict.champion_version or ""})
    metrics = {f"{who}_{tag}_nats_per_byte": getattr(losses, tag)
               for who, losses in (("challenger", verdict.challenger), ("champion", verdict.champion)) if losses
               for tag in ("domain", "general")}
    if metrics:
        tracking.log_metrics(uri, parent_run_id, metrics, step=0)
    text = verdict_markdown(verdict)
    tracking.log_text(uri, parent_run_id, text, "verdict.md")
    create_markdown_artifact(text, key="retrain-verdict", description=f"Retraining: {verdict.decision}")
    run_logger().info("retraining: %s (%s)", verdict.decision, verdict.reason)
    tracking.end_parent_run(uri, parent_run_id)


@task(name="check-inputs", retries=2, retry_delay_seconds=[2, 5])
def unchanged_task(config: PipelineConfig, parent_run_id: str) -> str | None:
    return unchanged_since(config, parent_run_id)


@task(name="skip", retries=2, retry_delay_seconds=[2, 5])
def skip_task(config: PipelineConfig, parent_run_id: str, previous_run: str) -> Verdict:
    verdict = skip(config, previous_run)
    record_verdict(config, parent_run_id, verdict)
    return verdict


# No retries: a second attempt would meet the version this one may already have promoted.
@task(name="challenge")
def challenge_task(config: PipelineConfig, parent_run_id: str, final_model: str, final_losses: Losses,
                   base_dir: str, sft_path: str, data: IngestResult, work_dir: str) -> Verdict:
    verdict = challenge(config, parent_run_id, final_model, final_losses, base_dir, sft_path, data, Path(work_dir))
    record_verdict(config, parent_run_id, verdict)
    return verdict
