"""More than one device: `train.devices: 2` trains a stage in two torchrun processes (gloo on CPU) with the same
global batch and sample order as one process, so its curves match the single-process run and its MLflow runs
have the same shape."""

import json
import math
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.finetune import finetune
from mixtune.core.config import ConfigError
from tasks.train import run_workers
from tests.conftest import ready_mlflow, share_cache, tiny_config

pytestmark = pytest.mark.e2e
# One stage of 10 steps of 16 samples (8 per process with two), a log line every step.
SECTIONS = {
    "run": {"keep": "all"},  # the checkpoints stay, for the manifest check below
    "schedule": {"stages": 1, "samples_per_stage": 160},
    "train": {"batch_size": 16, "logging_steps": 1},
    "validation": {"eval_steps": 5, "forgetting_budget": 10.0},
    "registry": {"skip_unchanged": False},
}
CURVES = ("train_loss", "domain_val_loss", "general_val_loss")


def stage_run(client: MlflowClient, parent_run_id: str):
    experiment = client.get_run(parent_run_id).info.experiment_id
    [run] = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return run


def curves(client: MlflowClient, run) -> dict[str, dict[int, float]]:
    return {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in run.data.metrics
    }


def test_two_processes_follow_the_single_process_curve(single_device_run, tmp_path, session_cache, mlflow_template):
    two = ready_mlflow(share_cache(tmp_path / "two", session_cache), mlflow_template)
    alone = single_device_run
    pair = finetune(tiny_config(two, **{**SECTIONS, "train": {**SECTIONS["train"], "devices": 2}}))

    client = MlflowClient(alone.tracking_uri)
    one = curves(client, stage_run(client, alone.parent_run_id))
    pair_client = MlflowClient(pair.tracking_uri)
    two_run = stage_run(pair_client, pair.parent_run_id)
    two = curves(pair_client, two_run)
    assert two_run.data.params["devices"] == "2" and two_run.info.status == "FINISHED"
    assert one["peak_rss_mb"][10] > 0 and two["peak_rss_mb"][10] > 0  # the stage's own peak, logged at its end
    # The same shape: every metric at the same steps, each step once (the second process logs nothing).
    assert {name: sorted(points) for name, points in one.items()} == {
        name: sorted(points) for name, points in two.items()
    }
    # Gradients are all-reduced and each process sums its own tokens: equal up to float summation order.
    worst = 0.0
    for name in CURVES:
        assert len(one[name]) >= 2, name
        for step, value in one[name].items():
            assert math.isclose(two[name][step], value, rel_tol=1e-4), (name, step, two[name][step], value)
            worst = max(worst, abs(two[name][step] - value) / abs(value))
    print(f"largest relative difference of the two-process curves: {worst:.2e}")
    assert pair.stages[0].steps == alone.stages[0].steps == 10
    # Both processes wrote their RNG state into each checkpoint before the first sealed it.
    manifest = json.loads(
        next(Path(pair.stages[0].stage_dir).glob("checkpoints/checkpoint-10/manifest.json")).read_text()
    )
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "sampler.json"} <= set(manifest["sha256"])


def test_a_failing_process_fails_the_task_with_its_error(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise ValueError('rank 1 ran out of luck')\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    with pytest.raises(RuntimeError, match="a training process failed") as failed:
        run_workers(command, "stage 1 on 2 processes")
    assert "rank 1 ran out of luck" in str(failed.value)


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train: .*batch_size 16 does not split over devices 3"):
        tiny_config(tmp_path, train={"devices": 3})
