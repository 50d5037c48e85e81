"""A champion belongs to one pipeline: the registered model is named after the run and its domain sources, and
a challenger judged on another domain validation set becomes the first champion of its own model."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks import tracking
from tasks.ingest import ingest
from tasks.mlflow_names import Tag
from tasks.registry import model_for, register_version
from tasks.tables import domain_val_digest
from tests.conftest import tiny_config, tiny_hf_model


def legal_config(tmp_path):
    rows = [
        {"instruction": f"Which article covers case {i}?", "output": f"Article {i % 17} covers it."} for i in range(60)
    ]
    path = tmp_path / "law_qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    config = tiny_config(tmp_path, run={"name": "legal"})
    config.data.sources[1] = config.data.sources[1].model_copy(update={"synthetic": None, "path": str(path)})
    return config


def test_two_pipelines_in_one_output_folder_get_two_registered_models(tmp_path):
    medical, legal = tiny_config(tmp_path, run={"name": "medical"}), legal_config(tmp_path)
    assert medical.run.output_dir == legal.run.output_dir
    assert medical.registered_model == "medical-synthetic-domain"
    assert legal.registered_model == "legal-law_qa"
    assert tiny_config(tmp_path, registry={"model_name": "shared"}).registered_model == "shared"


@pytest.mark.usefixtures("mlflow_db")
def test_a_challenger_for_another_domain_validation_set_gets_its_own_model(tmp_path):
    medical, legal = tiny_config(tmp_path, run={"name": "medical"}), legal_config(tmp_path)
    medical_val = domain_val_digest(sft_of(medical))
    legal_val = domain_val_digest(sft_of(legal))
    assert medical_val != legal_val
    tracker = tracking.start_parent_run(medical, "flow-medical")
    name = "shared"  # both pipelines forced into one registered model
    assert model_for(tracker, name, "champion", medical_val) == (name, None)
    model = tiny_hf_model(tmp_path / "model")
    tracker.log_artifacts(model, "final_model")
    version = register_version(
        tracker,
        name,
        str(model),
        "final_model",
        {Tag.DOMAIN_VAL_DIGEST: medical_val},
        "medical",
    )
    tracker.move_alias(name, "champion", version)
    tracker.end()  # a champion's run has ended FINISHED

    same_name, holder = model_for(tracker, name, "champion", medical_val)
    assert same_name == name and int(holder.version) == version
    own, none_yet = model_for(tracker, name, "champion", legal_val)
    assert own == f"shared-{legal_val[:8]}" and none_yet is None
    client = MlflowClient(tracker.uri)
    assert int(client.get_model_version_by_alias(name, "champion").version) == version  # left alone


def sft_of(config) -> str:
    """The domain validation rows as the token table would hold them: ingest's samples carry the same ids."""
    return ingest(config).samples


@pytest.mark.usefixtures("mlflow_db")
def test_a_registered_version_has_a_signature_a_described_model_and_a_source_in_its_runs_artifacts(tmp_path):
    """The registry page reads the version's MLmodel from its source: a `runs:` source made a server that serves
    artifacts answer 500 (it resolved it through its database tracking URI) and the page show no schema."""
    import yaml
    from mlflow.artifacts import download_artifacts

    config = tiny_config(tmp_path)
    tracker = tracking.start_parent_run(config, "flow-signature")
    model = tiny_hf_model(tmp_path / "model")
    tracker.log_artifacts(model, "final_model")
    MlflowClient(tracker.uri).create_registered_model("described")  # as the Compose stack's mlflow-init makes it
    register_version(tracker, "described", str(model), "final_model", {}, "a described version")
    client = MlflowClient(tracker.uri)
    version = client.get_model_version("described", "1")
    run_root = client.get_run(tracker.parent_run_id).info.artifact_uri
    assert version.source == f"{run_root}/mlflow_model" and version.description == "a described version"
    assert client.get_registered_model("described").description
    mlmodel = download_artifacts(f"{version.source}/MLmodel", dst_path=str(tmp_path / "read"), tracking_uri=tracker.uri)
    signature = yaml.safe_load(Path(mlmodel).read_text())["signature"]
    assert json.loads(signature["inputs"]) == [{"type": "string", "required": True}]
    assert json.loads(signature["outputs"]) == [{"type": "string", "required": True}]
    assert json.loads(signature["params"])[0]["name"] == "max_new_tokens"
