"""Content keys of the pipeline's inputs: what the ingest cache and the retraining check both hash."""

from __future__ import annotations

from pathlib import Path

from mixtune.core.cache import file_digest, fingerprint
from mixtune.core.config import PipelineConfig, Source
from tasks.readers import check_readable
from tasks.synthetic import GENERATOR_VERSION

INGEST_VERSION = 3


def source_fingerprint(source: Source, seed: int) -> dict:
    spec = source.model_dump(exclude={"path"})
    if source.synthetic:
        return {**spec, "generator": GENERATOR_VERSION, "seed": seed}
    check_readable(Path(source.path))
    return {**spec, "sha256": file_digest(source.path)}


def ingest_key(config: PipelineConfig) -> str:
    seed, data = config.run.seed, config.data
    options = data.model_dump(exclude={"sources"})
    return fingerprint(INGEST_VERSION, seed, options, [source_fingerprint(s, seed) for s in data.sources])
