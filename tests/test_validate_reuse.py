"""The validate task reuses the in-training evaluation of the restored checkpoint while its weights are
unchanged, and evaluates again when they are not."""

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from tasks import tracking, validate
from tasks.models import evaluate
from tasks.train import train_stage
from tests.records import stage_request
from tests.test_train import prepared, stage_mix  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.e2e  # real training of a stage from a pre-trained base


def test_validate_does_not_re_evaluate_an_unchanged_checkpoint(prepared, tmp_path, monkeypatch):  # noqa: F811
    config, tokens, base = prepared
    stage_run = tracking.start_parent_run(config, "flow-reuse").open_stage(1, "full")
    trained = train_stage(stage_request(config, stage_mix(tokens, tmp_path), tokens, base, tmp_path / "s1", stage_run))
    assert trained.best_losses is not None and trained.weights_digest
    fresh = evaluate(trained.model_dir, base, tokens.sft, config.validation.batch_size)
    assert trained.best_losses.domain == pytest.approx(fresh.domain, rel=1e-5)
    assert trained.best_losses.general == pytest.approx(fresh.general, rel=1e-5)

    calls = []
    monkeypatch.setattr(validate, "evaluate", lambda *args, **_: calls.append(args) or fresh)
    assert validate.validate_stage(config, trained, tokens.sft, base, [], stage_run) == trained.best_losses
    assert calls == []

    weights = f"{trained.model_dir}/model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    validate.validate_stage(config, trained, tokens.sft, base, [], stage_run)
    assert len(calls) == 1  # changed weights: evaluated again


@pytest.mark.usefixtures("mlflow_db")
def test_the_baseline_is_measured_once_per_base_model_and_validation_sets(prepared, tmp_path, monkeypatch):  # noqa: F811
    config, tokens, base = prepared
    config = config.model_copy(deep=True)
    config.run.output_dir = str(tmp_path)  # a cache of its own: no other test's baseline
    probes = [{"set": "domain", "prompt": [{"role": "user", "content": "hello"}], "reference": "hi"}]
    evaluated, answered = [], []
    real_evaluate, real_answers = validate.evaluate, validate.answer_probes
    monkeypatch.setattr(validate, "evaluate", lambda *a, **k: evaluated.append(a) or real_evaluate(*a, **k))
    monkeypatch.setattr(validate, "answer_probes", lambda *a, **k: answered.append(a) or real_answers(*a, **k))

    def baseline(sft_path: str, name: str):
        parent = tracking.start_parent_run(config, name)
        losses = validate.validate_base(config, base, sft_path, probes, parent)
        run = MlflowClient(parent.uri).get_run(parent.parent_run_id)
        artifacts = [a.path for a in MlflowClient(parent.uri).list_artifacts(parent.parent_run_id, "probes")]
        return losses, run.data.metrics, artifacts

    first, _, _ = baseline(tokens.sft, "flow-base-1")
    again, metrics, artifacts = baseline(tokens.sft, "flow-base-2")
    assert (len(evaluated), len(answered)) == (1, 1)  # the second run measured nothing
    assert again == first
    assert metrics["base_domain_val_loss"] == first.domain and metrics["base_general_val_loss"] == first.general
    assert artifacts == ["probes/stage-0-base.md"]

    sft = pd.read_parquet(tokens.sft)
    val = sft.index[sft["split"] == "val"]
    changed = tmp_path / "sft-changed.parquet"
    sft.drop(val[:1]).to_parquet(changed)  # one validation row fewer: other sets
    third, _, _ = baseline(str(changed), "flow-base-3")
    assert (len(evaluated), len(answered)) == (2, 2)
    assert third != first
