"""A process worker obeys only its deployment: `mixtune deploy --pool` locks the pool's job template, so a flow
run's job variables (the UI form's "Job Variables", or any API client's) cannot choose the command or the
environment. One `prefect server start`, one `mixtune deploy` (with no MLFLOW_TRACKING_URI) and one
`prefect worker start --type process` on 127.0.0.1 serve every test here."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.pool import env_variable
from tasks.mlflow_names import Tag
from tests.conftest import share_cache, tiny_raw_config
from tests.servers import BIN, QUIET_ENV, launch, prefect_server, stop
from tests.test_servers import create_run, end_state, post, request_counter, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
POOL = "it-locked"


def deploy(folder: Path, api_url: str, deploy_name: str) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    raw = tiny_raw_config(
        folder / "runs", deploy={"name": deploy_name}, schedule={"stages": 1, "samples_per_stage": 48}
    )
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, **QUIET_ENV, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(folder / "home")}
    env["PYTHONPATH"] = str(ROOT)
    env.pop("MLFLOW_TRACKING_URI", None)  # the deploying process knows no tracking server: the worker's is used
    command = [sys.executable, "-m", "mixtune.cli", "deploy", str(folder / "pipeline.yaml"), "--pool", POOL]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, session_cache):
    folder = tmp_path_factory.mktemp("worker")
    share_cache(folder / "served" / "runs", session_cache)  # the served run's base model: the session's
    with prefect_server(folder / "server") as url:
        deployed = deploy(folder / "served", url, "locked")
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        worker_env = {
            "PREFECT_API_URL": url,
            "PREFECT_HOME": str(folder / "worker-home"),
            "PYTHONPATH": str(ROOT),
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/worker-mlflow.db",
            # What a hostile run would want: a listener sees them in the Authorization header.
            "MLFLOW_TRACKING_USERNAME": "worker",
            "MLFLOW_TRACKING_PASSWORD": "worker-s3cret",
        }
        command = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
        worker = launch(command, worker_env, folder / "worker.log", cwd=folder)
        api = httpx.Client(base_url=url, timeout=30)
        try:
            yield SimpleNamespace(
                api=api,
                url=url,
                folder=folder,
                deployment=read(api, "/deployments/name/finetune/locked-manual"),
                tracking=MlflowClient(worker_env["MLFLOW_TRACKING_URI"]),
                log=folder / "worker.log",
            )
        finally:
            stop(worker)


def read(api: httpx.Client, path: str) -> dict:
    """GET, asked again while the server answers an error (its SQLite database is busy on loaded cores)."""
    return wait_for(lambda: (answer := api.get(path)).status_code == 200 and answer.json(), 60, path)


def stored_policy(api: httpx.Client) -> dict:
    variable = read(api, f"/variables/name/{env_variable(POOL)}")
    return json.loads(variable["value"]["MIXTUNE_SERVED_POLICY"])


def test_deploy_locks_the_pools_template_and_keeps_the_policy_out_of_job_variables(pool, tmp_path):
    template = read(pool.api, f"/work_pools/{POOL}")["base_job_template"]
    assert "command" not in template["job_configuration"]
    assert template["job_configuration"]["env"] == f"{{{{ prefect.variables.{env_variable(POOL)} }}}}"
    assert template["variables"]["additionalProperties"] is False
    assert [prop.get("not") for prop in template["variables"]["properties"].values()] == [{}]
    assert pool.deployment["job_variables"] == {}
    policy = stored_policy(pool.api)
    assert policy["fixed"]["deploy"]["name"] == "locked"
    assert policy["fixed_fields"]["run"]["output_dir"] == str(pool.folder / "served" / "runs")
    # Tracking, deploy, advisor and run.output_dir are the deployment's: not in the form, nor in its values.
    sections = pool.deployment["parameter_openapi_schema"]["definitions"]
    assert not {"tracking", "deploy", "advisor"} & set(sections["PipelineConfig"]["properties"])
    assert "output_dir" not in sections["Run"]["properties"]
    assert "output_dir" not in pool.deployment["parameters"]["config"]["run"]
    # Another pipeline's deployments would run under this one's policy: refused, the pool left as it was.
    other = deploy(tmp_path / "other", pool.url, "other")
    assert other.returncode == 2 and "give this one its own pool" in other.stderr, other.stderr[-2000:]
    assert stored_policy(pool.api) == policy


HOSTILE = {
    "command": lambda marker, listener: {"command": f"sh -c 'touch {marker}'"},
    "env tracking": lambda marker, listener: {"env": {"MLFLOW_TRACKING_URI": listener}},
    "env policy": lambda marker, listener: {
        "env": {"MIXTUNE_SERVED_POLICY": json.dumps({"tracking_uris": [listener], "data_roots": ["/"]})}
    },
}


@pytest.mark.parametrize("probe", HOSTILE)
def test_the_server_refuses_a_run_that_sends_job_variables(pool, tmp_path, probe):
    job_variables = HOSTILE[probe](tmp_path / "MARKER", "http://127.0.0.1:9")
    body = {"parameters": {"config": pool.deployment["parameters"]["config"]}, "job_variables": job_variables}
    refused = post(pool.api, f"/deployments/{pool.deployment['id']}/create_flow_run", body)
    assert refused.status_code == 422 and "Additional properties are not allowed" in refused.text, refused.text


def unchecked_run(pool, name: str, config: dict, job_variables: dict) -> str:
    """A flow run created without the deployment's endpoint: the server checks no job variable, so they
    reach the worker as sent."""
    body = {
        "name": name,
        "flow_id": pool.deployment["flow_id"],
        "deployment_id": pool.deployment["id"],
        "work_pool_name": POOL,
        "parameters": {"config": config},
        "job_variables": job_variables,
        "state": {"type": "SCHEDULED"},
    }
    created = post(pool.api, "/flow_runs/", body)
    assert created.status_code == 201 and created.json()["job_variables"] == job_variables, created.text
    return created.json()["id"]


def test_a_normal_run_completes_and_registers_and_job_variables_that_reach_the_worker_change_nothing(pool, tmp_path):
    form = pool.deployment["parameters"]["config"]
    run_id = create_run(pool.api, pool.deployment["id"], form).json()["id"]
    assert end_state(pool.api, run_id) == "COMPLETED", pool.log.read_text()[-4000:]
    experiment = pool.tracking.get_experiment_by_name("mixtune").experiment_id
    [parent] = pool.tracking.search_runs([experiment], f"tags.`{Tag.FLOW_RUN}` = '{run_id}'")
    assert parent.info.status == "FINISHED"
    assert pool.tracking.search_model_versions(f"run_id = '{parent.info.run_id}'")
    assert (pool.folder / "served" / "runs" / "test" / run_id).is_dir()  # the deployment's output_dir

    policy, marker = stored_policy(pool.api), tmp_path / "MARKER"
    outside = copy.deepcopy(form)  # what only a replaced policy would let through
    outside["data"]["sources"][1] = {"path": str(pool.log), "role": "domain"}
    with request_counter() as (listener, requests):
        runs = {
            probe: unchecked_run(pool, f"probe-{i}", outside if probe == "env policy" else form, make(marker, listener))
            for i, (probe, make) in enumerate(HOSTILE.items())
        }
        ended = {probe: end_state(pool.api, run) for probe, run in runs.items()}
        # The same inputs as the run above: a run that the worker started as the deployment says checks them
        # against the tracking server (the worker's) and records "no new data".
        assert ended == {"command": "COMPLETED", "env tracking": "COMPLETED", "env policy": "FAILED"}, ended
        assert requests == []
    assert not marker.exists()
    message = read(pool.api, f"/flow_runs/{runs['env policy']}")["state"]["message"]
    assert "data.sources.1.path" in message and "outside the folders this deployment may read" in message, message
    assert stored_policy(pool.api) == policy
    # Their "no new data" ticks went to the worker's tracking server, counted on the run they matched.
    assert pool.tracking.get_metric_history(parent.info.run_id, "no_new_data_ticks")
