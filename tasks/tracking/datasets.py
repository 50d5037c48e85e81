"""Data sources as MLflow dataset inputs: MLflow's dataset classes live here, behind the seam."""

from __future__ import annotations

import warnings

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag

from tasks.mlflow_names import MlflowTag


def dataset_inputs(sources: list[tuple[str, str, str, str]]) -> list[DatasetInput]:
    """Each (file, name, digest, role): the digest is the content hash the ingest cache keys on."""
    inputs = []
    for file, name, digest, role in sources:
        with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so each time
            warnings.simplefilter("ignore", UserWarning)
            location = resolve_dataset_source(file)
        dataset = MetaDataset(location, name=name, digest=digest[:36])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(str(MlflowTag.DATA_CONTEXT), role)]))
    return inputs
