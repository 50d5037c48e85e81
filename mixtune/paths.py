"""Where a pipeline writes: content-addressed caches are shared, stage outputs belong to one flow run."""

from __future__ import annotations

from pathlib import Path


def cache_dir(output_dir: str, stage: str, key: str) -> Path:
    return Path(output_dir) / "cache" / f"{stage}-{key}"


def run_dir(output_dir: str, run_name: str, flow_run_id: str) -> Path:
    return Path(output_dir) / run_name / flow_run_id


def default_tracking_uri(output_dir: str) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
