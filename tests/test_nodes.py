"""Two nodes, actually run: two torchrun agents on 127.0.0.1 join through a c10d rendezvous (gloo, one process
each) for one SFT stage, as docs/scale-out.md tells a user to do on two machines, and the stage follows the
single-device curve and leaves the same MLflow record."""

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.finetune import finetune
from tests.conftest import ready_mlflow, share_cache, tiny_config
from tests.servers import free_port
from tests.test_devices import CURVES, SECTIONS, curves, stage_run

pytestmark = pytest.mark.integration


def second_node(run_root: Path, torchrun_args: list[str], started: list) -> None:
    """The other machine's part: once the run has written the stage's request, start the same worker on it."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        requests = list(run_root.glob("**/stage-1/devices-request.json"))
        if requests:
            command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "--nproc-per-node=1"]
            done = subprocess.run([*command, "-m", "tasks.train", str(requests[0])], capture_output=True, text=True)
            started.append(done)
            return
        time.sleep(0.2)
    started.append(None)


def test_two_nodes_follow_the_single_device_curve(
    single_device_run, tmp_path, session_cache, mlflow_template, monkeypatch
):
    alone = single_device_run
    two = ready_mlflow(share_cache(tmp_path / "two", session_cache), mlflow_template)

    port = free_port()
    torchrun_args = [
        "--nnodes=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=two-nodes",
        "--local-addr=127.0.0.1",
    ]
    monkeypatch.setenv("MIXTUNE_TORCHRUN_ARGS", " ".join(torchrun_args))
    other: list = []
    node = threading.Thread(target=second_node, args=(two, torchrun_args, other), daemon=True)
    node.start()
    pair = finetune(tiny_config(two, **SECTIONS))
    node.join(120)

    [done] = other
    assert done is not None and done.returncode == 0, done and done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(alone.tracking_uri)
    one = curves(client, stage_run(client, alone.parent_run_id))
    pair_client = MlflowClient(pair.tracking_uri)
    two_run = stage_run(pair_client, pair.parent_run_id)
    two = curves(pair_client, two_run)
    assert two_run.info.status == "FINISHED"
    assert {name: sorted(points) for name, points in one.items()} == {
        name: sorted(points) for name, points in two.items()
    }
    for name in CURVES:
        assert len(one[name]) >= 2, name
        for step, value in one[name].items():
            assert math.isclose(two[name][step], value, rel_tol=1e-4), (name, step, two[name][step], value)
    assert pair.stages[0].steps == alone.stages[0].steps == 10
