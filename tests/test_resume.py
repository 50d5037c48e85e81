"""Crash anywhere, lose nothing: `mixtune run` killed (SIGKILL to its process group) during pre-training,
mid-stage and between stages, rerun each time, ends on exactly the weights of an uninterrupted run, in one
MLflow parent run with one run per stage and no step logged twice."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tasks.mlflow_names import Tag
from tests.conftest import tiny_raw_config

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
STAGES = 3


def write_config(folder: Path) -> Path:
    # 5 epochs of the tiny config's packed pre-training text: 30 steps, a checkpoint sealed every 6
    raw = tiny_raw_config(folder / "runs", pretrain={"epochs": 5}, validation={"forgetting_budget": 10.0})
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(config.parent / "prefect"), "PYTHONPATH": str(Path.cwd())}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mixtune.cli", "run", str(config)],
            cwd=config.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches Prefect's server and workers too
        )


def run_until(config: Path, log: Path, reached, limit: float = 900) -> None:
    """Start a run and SIGKILL its process group as soon as `reached()` holds; fail if it ends first."""
    process, deadline = start(config, log), time.monotonic() + limit
    while not reached():
        assert process.poll() is None, f"the run ended before the kill point: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(config: Path, log: Path) -> None:
    process = start(config, log)
    assert process.wait(timeout=900) == 0, log.read_text()[-3000:]


def stage_folder(runs: Path, stage: int) -> Path | None:
    found = list((runs / "test").glob(f"*/stage-{stage}"))
    return found[0] if found else None


def checkpoint_sealed(runs: Path, stage: int, step: int):
    def reached() -> bool:
        folder = stage_folder(runs, stage)
        return bool(folder) and (folder / "checkpoints" / f"checkpoint-{step}" / "manifest.json").is_file()

    return reached


def gate_passed(runs: Path, stage: int):
    def reached() -> bool:
        folder = stage_folder(runs, stage)
        return bool(folder) and (folder / "report.json").is_file()

    return reached


def pretraining_checkpoint(runs: Path, step: int):
    """30 pre-training steps (see write_config), sealed every 6."""
    return lambda: any((runs / "cache").glob(f"base-*/checkpoints/checkpoint-{step}/manifest.json"))


def assert_mlflow_shape(runs: Path) -> None:
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mixtune")
    every = client.search_runs([experiment.experiment_id])
    parents = [r for r in every if r.data.tags.get(Tag.KIND) == "pipeline"]
    assert len(parents) == 1, [(r.info.run_id, r.info.status) for r in parents]
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags[Tag.STAGE]) for r in children) == list(range(1, STAGES + 1))
    assert {r.info.status for r in every} == {"FINISHED"}
    for run in every:
        for name in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert len(steps) == len(set(steps)), f"{name} of {run.info.run_name}: steps {sorted(steps)}"


def test_a_run_killed_three_times_ends_on_the_uninterrupted_weights(tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir(), resumed_dir.mkdir()
    straight_log = straight_dir / "run.log"
    straight = start(write_config(straight_dir), straight_log)

    config, log, runs = write_config(resumed_dir), resumed_dir / "run.log", resumed_dir / "runs"
    rng = random.Random(14)
    pretrained = rng.choice([6, 12, 18])  # killed right after this pre-training checkpoint is sealed
    mid = rng.choice([1, 2])  # killed right after the mid-stage checkpoint of this stage (10 steps, saves at 5)
    between = rng.choice(range(mid, STAGES))  # and after this stage's gate, before the next stage starts
    run_until(config, log, pretraining_checkpoint(runs, pretrained))
    run_until(config, log, checkpoint_sealed(runs, mid, 5))
    run_until(config, log, gate_passed(runs, between))
    finish(config, log)
    assert straight.wait(timeout=900) == 0, straight_log.read_text()[-3000:]

    text = log.read_text(errors="replace")
    assert text.count("resuming interrupted run") == 3
    assert "pre-training resumes from" in text
    assert f"stage {mid} resumes from" in text
    assert f"stage {between}: finished before the interruption, reused" in text
    # run.keep: delivered leaves one final model: the delivered stage's, in the one run folder every rerun reused
    finals = list((runs / "test").glob("*/stage-*/final/model.safetensors"))
    straight_finals = list((straight_dir / "runs" / "test").glob("*/stage-*/final/model.safetensors"))
    assert len(finals) == len(straight_finals) == 1
    assert finals[0].parent.parent.name == straight_finals[0].parent.parent.name  # the same stage delivered
    expected, got = load_file(straight_finals[0]), load_file(finals[0])
    assert got.keys() == expected.keys()
    unequal = [name for name, tensor in expected.items() if not torch.equal(got[name], tensor)]
    assert unequal == []
    assert_mlflow_shape(runs)
    for line in text.splitlines():  # what was resumed and redone, for the record (pytest -s shows it)
        if "resum" in line or "reused" in line or "set aside" in line or " step " in line:
            print(line[-220:])
