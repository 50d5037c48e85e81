"""The validate task reuses the in-training evaluation of the restored checkpoint while its weights are
unchanged, and evaluates again when they are not."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks import tracking, validate
from tasks.models import evaluate
from tasks.train import train_stage
from tests.test_train import prepared, stage_mix  # noqa: F401  (the module-scoped fixture)


def test_validate_does_not_re_evaluate_an_unchanged_checkpoint(prepared, tmp_path, monkeypatch):  # noqa: F811
    config, tokens, base = prepared
    stage_run = tracking.start_parent_run(config, "flow-reuse").open_stage(1, "full")
    trained = train_stage(config, stage_mix(tokens, tmp_path), tokens.sft, base, base, str(tmp_path / "s1"), stage_run)
    assert trained.best_losses is not None and trained.weights_digest
    fresh = evaluate(trained.model_dir, base, tokens.sft, config.validation.batch_size)
    assert trained.best_losses.domain == pytest.approx(fresh.domain, rel=1e-5)
    assert trained.best_losses.general == pytest.approx(fresh.general, rel=1e-5)

    calls = []
    monkeypatch.setattr(validate, "evaluate", lambda *args: calls.append(args) or fresh)
    assert validate.validate_stage(config, trained, tokens.sft, base, [], stage_run) == trained.best_losses
    assert calls == []

    weights = f"{trained.model_dir}/model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    validate.validate_stage(config, trained, tokens.sft, base, [], stage_run)
    assert len(calls) == 1  # changed weights: evaluated again
