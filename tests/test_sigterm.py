"""SIGTERM ends `mixtune run` promptly wherever it is, and its MLflow runs end KILLED."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_raw_config

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 10  # the acceptance line: from the signal to the process's exit


@pytest.mark.integration
def test_sigterm_during_the_base_evaluation_ends_the_run_within_10_s_with_its_runs_killed(tmp_path):
    out = tmp_path / "out"
    raw = tiny_raw_config(out, pretrain={"epochs": 1, "max_steps": 4}, schedule={"stages": 1, "samples_per_stage": 32})
    config, marker, log = tmp_path / "pipeline.yaml", tmp_path / "evaluating", tmp_path / "run.log"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # as a user runs it: its own temporary Prefect server
    command = [sys.executable, str(ROOT / "tests" / "endless_base_eval.py"), str(marker), "run", str(config)]
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        while not marker.exists():  # however long the start takes on a loaded machine
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the evaluation loop
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    print(f"SIGTERM to exit: {seconds:.1f} s")
    assert seconds <= BOUND_S, f"{seconds:.1f} s from SIGTERM to exit\n{text[-3000:]}"
    assert code == 128 + signal.SIGTERM and "terminated by SIGTERM" in text, text[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
