"""Integration with real servers on 127.0.0.1: `prefect server start` with a served deployment, a flow process
killed mid-stage, and servers that do not answer (MLflow's basic-auth server: test_basic_auth_server.py)."""

import copy
import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.finetune import finetune
from mixtune.core import preflight
from mixtune.core.preflight import Unreachable
from tasks.mlflow_names import Tag
from tests.conftest import ONE_STEP, share_cache, tiny_config, tiny_raw_config
from tests.servers import BIN, QUIET_ENV, free_port, launch, prefect_server, stop

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# A stage long enough (250 steps) to be caught mid-way: the data must be large enough that the plan's epoch
# budget does not shrink the stage (on the default tiny data it would cut 4,000 samples to 1,320). Its base model
# is built once, in the session's cache, for the two tests that use it.
LONG_STAGE = {
    "data": {
        "sources": [
            {"synthetic": "general", "samples": 6000, "role": "general"},
            {"synthetic": "domain", "samples": 3000, "role": "domain", "val_fraction": 0.15},
        ]
    },
    "schedule": {"stages": 1, "samples_per_stage": 4000},
}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


def write_config(folder: Path, **sections) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(folder / "runs", **sections)))
    return path


def wait_for(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(1)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def deployment(api: httpx.Client, name: str) -> dict | None:
    response = api.get(f"/deployments/name/finetune/{name}")
    return response.json() if response.status_code == 200 else None


def test_served_deployment_runs_with_one_changed_parameter_and_the_server_rejects_a_bad_one(
    prefect_api, tmp_path, session_cache
):
    share_cache(tmp_path / "runs", session_cache)
    config_path = write_config(
        tmp_path, deploy={"name": "it", "cron": "0 3 * * *"}, schedule={"stages": 1, "samples_per_stage": 48}
    )
    env = {"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    served = launch([str(BIN / "mixtune"), "serve", str(config_path)], env, tmp_path / "serve.log", cwd=tmp_path)
    api = httpx.Client(base_url=prefect_api, timeout=10)
    try:
        manual = wait_for(lambda: deployment(api, "it-manual"), 90, "the served deployment")
        scheduled = wait_for(lambda: deployment(api, "it-scheduled"), 60, "the scheduled deployment")  # one by one
        assert scheduled["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert "Peak learning rate of each stage" in json.dumps(manual["parameter_openapi_schema"])
        form = manual["parameters"]["config"]  # the UI form's defaults: the loaded pipeline.yaml
        assert form["schedule"]["samples_per_stage"] == 48

        bad = copy.deepcopy(form)
        bad["train"]["learning_rate"] = -1
        rejected = post_run(api, manual["id"], bad)
        assert rejected.status_code == 409 and "learning_rate" in rejected.text, rejected.text

        changed = copy.deepcopy(form)
        changed["train"]["learning_rate"] = 0.002
        created = create_run(api, manual["id"], changed)
        run_id = created.json()["id"]
        assert end_state(api, run_id) == "COMPLETED", (tmp_path / "serve.log").read_text()[-4000:]
        client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
        experiment = client.get_experiment_by_name("mixtune").experiment_id
        [run] = client.search_runs([experiment], f"tags.`{Tag.FLOW_RUN}` = '{run_id}'")
        assert run.data.params["train.learning_rate"] == "0.002" and run.info.status == "FINISHED"

        # A run may not send the worker's credentials elsewhere, nor read outside the served folder. The
        # tracking section is the deployment's: not in the form, and refused by the server if a run sends it.
        assert "tracking" not in form
        outside = tmp_path.parent / f"{tmp_path.name}-creds.jsonl"
        outside.write_text('{"secret": "s3cret-row"}\n')
        with request_counter() as (listener, requests):
            elsewhere = {**copy.deepcopy(form), "tracking": {"tracking_uri": listener}}
            refused = post_run(api, manual["id"], elsewhere)
            assert refused.status_code == 409 and "tracking" in refused.text, refused.text
            sneaky = copy.deepcopy(form)
            sneaky["data"]["sources"][1] = {"path": str(tmp_path / ".." / outside.name), "role": "domain"}
            created = create_run(api, manual["id"], sneaky)
            assert end_state(api, created.json()["id"]) == "FAILED"
            assert "data.sources.1.path:" in (tmp_path / "serve.log").read_text()
            assert requests == []
        written = [*(tmp_path / "runs").rglob("*.jsonl"), *session_cache.rglob("*.jsonl")]  # rglob skips the link
        assert "s3cret-row" not in "".join(p.read_text(errors="replace") for p in written)

        # Cancelled from the UI mid-stage: the runner's cancellation hook ends the MLflow runs KILLED.
        long = copy.deepcopy(form)
        long["data"]["sources"] = LONG_STAGE["data"]["sources"]
        long["schedule"].update(LONG_STAGE["schedule"])
        run_id = create_run(api, manual["id"], long).json()["id"]
        query = f"tags.`{Tag.FLOW_RUN}` = '{run_id}'"
        parent = wait_for(lambda: client.search_runs([experiment], query), 180, "the long run's MLflow run")[0]
        stage = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        wait_for(lambda: client.search_runs([experiment], stage), 180, "its stage to start")
        assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # cancelled mid-stage, not after
        cancel = {"state": {"type": "CANCELLING"}, "force": True}
        wait_for(lambda: api.post(f"/flow_runs/{run_id}/set_state", json=cancel).status_code < 300, 60, "cancelling")
        assert end_state(api, run_id) == "CANCELLED"
        ended = [client.get_run(parent.info.run_id), *client.search_runs([experiment], stage)]
        wait_for(
            lambda: all(client.get_run(r.info.run_id).info.status == "KILLED" for r in ended),
            30,
            "the cancelled run's MLflow runs to end KILLED",
        )
    finally:
        stop(served)


def post_run(api: httpx.Client, deployment_id: str, config: dict) -> httpx.Response:
    """Asks for a flow run of the deployment."""
    return post(api, f"/deployments/{deployment_id}/create_flow_run", {"parameters": {"config": config}})


def post(api: httpx.Client, path: str, body: dict) -> httpx.Response:
    """The server answers 503 while its SQLite database is busy (loaded cores, a flow run writing its states),
    so a server error is asked again for up to a minute."""
    deadline = time.monotonic() + 60
    while True:
        answer = api.post(path, json=body)
        if answer.status_code < 500 or time.monotonic() > deadline:
            return answer
        time.sleep(2)


def create_run(api: httpx.Client, deployment_id: str, config: dict) -> httpx.Response:
    created = post_run(api, deployment_id, config)
    assert created.status_code == 201, created.text
    return created


@contextmanager
def request_counter():
    """An HTTP listener on 127.0.0.1 that records every request it gets (and answers 404)."""
    requests = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.command, self.path, self.headers.get("Authorization")))
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()


def end_state(api: httpx.Client, run_id: str) -> str:
    return wait_for(lambda: (s := state_of(api, run_id)) in TERMINAL and s, 300, f"flow run {run_id} to end")


def state_of(api: httpx.Client, run_id: str) -> str | None:
    """The flow run's state type; None while the server answers an error (a busy database is retried)."""
    answer = api.get(f"/flow_runs/{run_id}")
    return answer.json()["state"]["type"] if answer.status_code == 200 else None


def running_runs(db: Path) -> list:
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("mixtune")
    return client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []


def test_a_killed_flow_process_leaves_no_running_mlflow_run_after_the_next_start(
    prefect_api, prefect_harness, tmp_path, session_cache
):
    share_cache(tmp_path / "runs", session_cache)
    config_path = write_config(tmp_path, **LONG_STAGE)
    env = {"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "home")}
    process = launch([str(BIN / "mixtune"), "run", str(config_path)], env, tmp_path / "run.log")
    db = tmp_path / "runs" / "mlflow.db"
    try:
        # Read MLflow only once the stage has begun: the database is then made (two writers could race on it).
        wait_for(lambda: list((tmp_path / "runs").glob("test/*/stage-1/mix.parquet")), 240, "stage 1's mix")
        wait_for(lambda: any(Tag.STAGE in r.data.tags for r in running_runs(db)), 120, "a running stage")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    orphans = {r.info.run_id for r in running_runs(db)}
    assert len(orphans) == 2  # the parent and its stage, as SIGKILL left them

    finetune(tiny_config(tmp_path / "runs", **ONE_STEP))
    client = MlflowClient(f"sqlite:///{db}")
    assert running_runs(db) == []
    assert {client.get_run(r).info.status for r in orphans} == {"KILLED"}


def test_unreachable_servers_fail_at_once_naming_the_url(prefect_harness, tmp_path, monkeypatch):
    """A refused connection is not waited for: no retry line, no backoff wait (the subprocesses' 60 s timeout is
    only the outer bound: wall time on a loaded machine is no measure of it)."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(tmp_path / "home")}
    (tmp_path / "mlflow").mkdir(), (tmp_path / "prefect").mkdir()
    cases = [
        (write_config(tmp_path / "mlflow", tracking={"tracking_uri": dead}), env, dead),
        (write_config(tmp_path / "prefect"), {**env, "PREFECT_API_URL": f"{dead}/api"}, f"{dead}/api"),
    ]
    for config_path, case_env, url in cases:
        done = subprocess.run(
            [str(BIN / "mixtune"), "run", str(config_path)], env=case_env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and url in done.stderr and "unreachable" in done.stderr, done.stderr
        assert "asking again" not in done.stderr
        assert not (config_path.parent / "runs").exists()  # before any work
    done = subprocess.run(
        [str(BIN / "mixtune"), "compare", str(cases[1][0]), "--tracking-uri", dead],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and dead in done.stderr and "asking again" not in done.stderr
    monkeypatch.setattr(preflight, "wait", lambda seconds: pytest.fail(f"waited {seconds} s for a refused connection"))
    with pytest.raises(Unreachable, match=dead):  # a deployment's run: the flow checks before its first task
        finetune(tiny_config(tmp_path / "runs", tracking={"tracking_uri": dead}))
