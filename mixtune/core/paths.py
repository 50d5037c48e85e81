"""Where a pipeline writes: content-addressed caches are shared, stage outputs belong to one flow run.

Every folder a run uses is named here, so no module re-derives one by walking up from another."""

from __future__ import annotations

import os
from pathlib import Path

# Entries are keyed by content, so any pipeline may share them: with this set, a new output folder starts from
# the ingest, tokens and base-model evaluation that another one already has.
SHARED_CACHE_ENV = "MIXTUNE_CACHE_DIR"


def cache_root(output_dir: str) -> Path:
    shared = os.environ.get(SHARED_CACHE_ENV, "").strip()
    return Path(shared) if shared else Path(output_dir) / "cache"


def cache_is_shared() -> bool:
    return bool(os.environ.get(SHARED_CACHE_ENV, "").strip())


def cache_dir(output_dir: str, stage: str, key: str) -> Path:
    return cache_root(output_dir) / f"{stage}-{key}"


def run_dir(output_dir: str, run_name: str, flow_run_id: str) -> Path:
    return Path(output_dir) / run_name / flow_run_id


def locks_dir(output_dir: str) -> Path:
    return Path(output_dir) / "locks"


def stage_dir(run_folder: str | Path, stage: int) -> Path:
    return Path(run_folder) / f"stage-{stage}"


def plots_dir(run_folder: str | Path) -> Path:
    return Path(run_folder) / "plots"


def default_tracking_uri(output_dir: str) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def tracking_uri(config) -> str:
    """The config's, else $MLFLOW_TRACKING_URI, else a SQLite database beside the run's outputs."""
    return (
        config.tracking.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(config.run.output_dir)
    )
