"""Content keys of the pipeline's inputs: what the ingest cache and the retraining check both hash."""

from __future__ import annotations

from pathlib import Path

from mixtune.core.cache import file_digest, fingerprint
from mixtune.core.config import PipelineConfig, Source
from tasks.files import checked_files, source_digest
from tasks.synthetic import GENERATOR_VERSION

INGEST_VERSION = 4  # 4: prompt-completion and key-pair rows read; compressed files and folders


def source_fingerprint(source: Source, seed: int) -> dict:
    spec = source.model_dump(exclude={"path"})
    if source.synthetic:
        return {**spec, "generator": GENERATOR_VERSION, "seed": seed}
    return {**spec, "sha256": source_digest(checked_files(Path(source.path), source.split))}


BUNDLED_PROMPTS = Path(__file__).with_name("rehearsal_prompts.jsonl")


def rehearsal_prompts(config: PipelineConfig) -> Path:
    return Path(config.data.self_rehearsal.prompts or BUNDLED_PROMPTS)


def ingest_key(config: PipelineConfig) -> str:
    seed, data = config.run.seed, config.data
    # The rehearsal and the self-distilled answers are made after ingest, from the base model: their settings are
    # no part of what ingest reads.
    made_later = {"rehearsal", "self_rehearsal", "self_distill", "self_distill_tokens"}
    options = data.model_dump(exclude={"sources", *made_later})
    return fingerprint(INGEST_VERSION, seed, options, [source_fingerprint(s, seed) for s in data.sources])


def rehearsal_inputs(config: PipelineConfig) -> dict | None:
    """What the rehearsal source is made from, besides the base model: its settings and its prompts' bytes."""
    if config.data.rehearsal == "none":
        return None
    settings = config.data.self_rehearsal.model_dump(exclude={"prompts"})
    return {**settings, "prompts_sha256": file_digest(rehearsal_prompts(config))}


def distill_inputs(config: PipelineConfig) -> dict | None:
    """What the self-distilled answers are made with, besides the base model and the data; None when off."""
    if not config.data.self_distill:
        return None
    return {"self_distill_tokens": config.data.self_distill_tokens}
