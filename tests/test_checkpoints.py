"""A damaged checkpoint is never trained on: resume sets it aside, naming the file, and continues from the
previous good one, ending on exactly the weights of an uninterrupted run."""

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerState

from tasks import callbacks, tracking
from tasks.checkpoints import CheckpointError, problem_with, seal
from tasks.gate import finished_stage
from tasks.guard import GateDecision
from tasks.lm import TokenLossTrainer
from tasks.mix import mix_stage
from tasks.records import StageReport, TokenLosses
from tasks.stage_time import StageTime
from tasks.train import train_stage
from tests.conftest import ready_mlflow, tiny_config
from tests.records import stage_request

pytestmark = pytest.mark.e2e  # every test starts from real stages trained in the module's fixture

KINDS = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "sampler.json"]


class Crash(RuntimeError):
    pass


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {"truncate": truncate, "zero": zero, "flip": flip}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base, mlflow_template):
    """An uninterrupted stage, and the same stage crashed at step 5 with checkpoints at steps 2 and 4."""
    folder = ready_mlflow(tmp_path_factory.mktemp("checkpoints"), mlflow_template)
    config = tiny_config(
        folder,
        schedule={"samples_per_stage": 160},
        train={"keep_checkpoints": 3},  # the tests damage one checkpoint and resume from the one before
        validation={"eval_steps": 2, "patience": 10},
    )
    tokens, base = tiny_base
    sft = pd.read_parquet(tokens.sft)
    mix = mix_stage(sft[sft["split"] == "train"], 1, 0.3, 160, seed=0, manifest=str(folder / "mix.parquet"))
    stage = tracking.start_parent_run(config, "flow-straight").open_stage(1, "full")
    straight = train_stage(stage_request(config, mix, tokens, base, folder / "straight", stage))
    crashed = folder / "crashed"
    with pytest.MonkeyPatch.context() as patch:
        original = callbacks.ProgressCallback.on_step_end

        def on_step_end(self, args, state, control, **kwargs):
            original(self, args, state, control, **kwargs)
            if state.global_step == 5:
                raise Crash("simulated crash")

        patch.setattr(callbacks.ProgressCallback, "on_step_end", on_step_end)
        stage = tracking.start_parent_run(config, "flow-crashed").open_stage(1, "full")
        with pytest.raises(Crash):
            train_stage(stage_request(config, mix, tokens, base, crashed, stage))
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return config, mix, tokens, base, load_file(Path(straight.model_dir) / "model.safetensors"), crashed


def resume(setup, folder: Path, flow_run: str):
    config, mix, tokens, base, _, _ = setup
    stage = tracking.start_parent_run(config, flow_run).open_stage(1, "full")
    return train_stage(stage_request(config, mix, tokens, base, folder, stage))


def assert_same_weights(expected: dict, model_dir: str) -> None:
    got = load_file(Path(model_dir) / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_checkpoint_file_is_set_aside_and_the_previous_one_used(setup, tmp_path, caplog, kind, damage):
    folder = tmp_path / "stage-1"
    shutil.copytree(setup[-1], folder)
    damaged = folder / "checkpoints" / "checkpoint-4" / kind
    DAMAGES[damage](damaged)
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        result = resume(setup, folder, f"flow-{kind}-{damage}")
    assert any(str(damaged) in r.getMessage() and "set aside" in r.getMessage() for r in caplog.records)
    assert result.global_step == 10
    assert_same_weights(setup[4], result.model_dir)
    (aside,) = (folder / "set-aside").iterdir()
    assert aside.name.startswith("checkpoint-4-")


def test_a_file_that_matches_its_digest_but_does_not_load_is_set_aside(setup, tmp_path, caplog):
    folder = tmp_path / "stage-1"
    shutil.copytree(setup[-1], folder)
    checkpoint = folder / "checkpoints" / "checkpoint-4"
    truncate(checkpoint / "optimizer.pt")
    seal(checkpoint)  # as if the file had been damaged before the checkpoint was sealed
    assert "optimizer.pt: does not load" in problem_with(checkpoint)
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        result = resume(setup, folder, "flow-unloadable")
    assert any("optimizer.pt: does not load" in r.getMessage() for r in caplog.records)
    assert_same_weights(setup[4], result.model_dir)


def test_with_every_checkpoint_damaged_the_stage_restarts_from_its_initial_weights(setup, tmp_path, caplog):
    folder = tmp_path / "stage-1"
    shutil.copytree(setup[-1], folder)
    for step in (2, 4):
        flip(folder / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        result = resume(setup, folder, "flow-all-damaged")
    assert any("starting again from the initial weights" in r.getMessage() for r in caplog.records)
    assert_same_weights(setup[4], result.model_dir)


def test_an_unsealed_checkpoint_counts_as_interrupted(setup, tmp_path, caplog):
    folder = tmp_path / "stage-1"
    shutil.copytree(setup[-1], folder)
    (folder / "checkpoints" / "checkpoint-4" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        result = resume(setup, folder, "flow-unsealed")
    assert any("not completely written" in r.getMessage() for r in caplog.records)
    assert_same_weights(setup[4], result.model_dir)


def test_a_damaged_final_model_is_set_aside_and_the_stage_finished_again(setup, tmp_path, caplog):
    folder = tmp_path / "stage-1"
    shutil.copytree(setup[-1], folder)
    finished = resume(setup, folder, "flow-final")
    flip(Path(finished.model_dir) / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        again = resume(setup, folder, "flow-final")
    assert any("final" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert_same_weights(setup[4], again.model_dir)


def test_a_damaged_best_checkpoint_is_refused_at_the_end_of_a_stage(setup, tmp_path):
    best = tmp_path / "checkpoint-2"
    shutil.copytree(setup[-1] / "checkpoints" / "checkpoint-2", best)
    flip(best / "model.safetensors")
    trainer = object.__new__(TokenLossTrainer)  # only the state matters before anything is loaded
    trainer.state, trainer.clock = TrainerState(best_model_checkpoint=str(best), global_step=4), StageTime()
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 does not match"):
        trainer._load_best_model()


def test_the_best_checkpoint_is_not_read_back_when_it_holds_the_weights_in_memory(setup, tmp_path):
    best = tmp_path / "checkpoint-2"
    shutil.copytree(setup[-1] / "checkpoints" / "checkpoint-2", best)
    (best / "model.safetensors").unlink()  # read back, this would fail the stage
    trainer = object.__new__(TokenLossTrainer)
    trainer.state, trainer.clock = TrainerState(best_model_checkpoint=str(best), global_step=2), StageTime()
    trainer._load_best_model()
    assert trainer.clock.seconds["best model load"] >= 0


def test_a_stage_report_is_reused_only_while_its_model_verifies(setup, tmp_path):
    model = tmp_path / "stage-1" / "final"
    shutil.copytree(setup[-1] / "checkpoints" / "checkpoint-2", model)  # any sealed folder stands for final/
    gate = GateDecision(decision="continue", general_drift=0.01, reason="within budget")
    report = StageReport(
        stage=1,
        target_share=0.3,
        realised_share=0.3,
        source_epochs={},
        losses=TokenLosses(domain=1.0, general=2.0),
        gate=gate,
        steps=10,
        best_step=10,
        stopped_early=False,
        stop_reason=None,
        tokens_per_second=1.0,
        stage_dir=str(model.parent),
        model_dir=str(model),
        run_id="run",
    )
    (model.parent / "report.json").write_text(report.model_dump_json())
    assert finished_stage(model.parent) == report
    flip(model / "model.safetensors")
    assert finished_stage(model.parent) is None
