"""A whole `mixtune run` logging to a real MLflow server with basic auth on 127.0.0.1: the run works and the
password reaches no file, parameter, tag or console line. Its own module: the suite's longest test, which xdist
(a module per worker) can then run beside the other server tests instead of after them."""

import os
import secrets
import subprocess

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mixtune.core.preflight import Unreachable, check_tracking_server
from tasks.mlflow_names import Tag
from tests.conftest import ONE_STEP, share_cache, tiny_raw_config
from tests.servers import BIN, QUIET_ENV, mlflow_server

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def write_config(folder, **sections):
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(folder / "runs", **sections)))
    return path


def test_a_whole_run_logs_to_an_mlflow_server_with_basic_auth_and_its_password_is_nowhere(
    tmp_path, monkeypatch, session_cache
):
    """`mixtune run` with the password in the tracking URI: the run works, and the password is in no param,
    tag, artifact, output file, Prefect database or console line."""
    share_cache(tmp_path / "runs", session_cache)  # built from the data alone: no tracking URI reaches it
    user = os.environ.get("MIXTUNE_TEST_MLFLOW_USER", "mixtune-admin")
    password = os.environ.get("MIXTUNE_TEST_MLFLOW_PASSWORD") or secrets.token_urlsafe(18)
    with mlflow_server(tmp_path / "mlflow", user, password) as uri:
        anonymous = httpx.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1})
        assert anonymous.status_code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(Unreachable, match="refused the credentials"):
            check_tracking_server(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

        with_password = uri.replace("http://", f"http://{user}:{password}@")
        config_path = write_config(tmp_path, tracking={"tracking_uri": with_password}, **ONE_STEP)
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(tmp_path / "prefect-home")}
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL"):
            env.pop(name, None)  # the URI is the only place the run can learn the password from
        done = subprocess.run(
            [str(BIN / "mixtune"), "run", str(config_path)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        console = done.stdout + done.stderr
        assert done.returncode == 0, console[-4000:]

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("mixtune").experiment_id
        [parent] = client.search_runs([experiment], f"tags.`{Tag.KIND}` = 'pipeline'")
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert parent.info.status == "FINISHED" and len(children) == 1
        assert {c.info.status for c in children} == {"FINISHED"}
        assert parent.data.params["tracking.tracking_uri"] == uri
        assert "final_model" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        champion = client.get_model_version_by_alias("test-synthetic-domain", "champion")
        assert champion.run_id == parent.info.run_id
        # What the registry page asks for: a runs:/ source made this server (--serve-artifacts) answer 500.
        mlmodel = httpx.get(
            f"{uri}/model-versions/get-artifact",
            params={"path": "MLmodel", "name": "test-synthetic-domain", "version": champion.version},
            auth=(user, password),
        )
        assert mlmodel.status_code == 200 and "max_new_tokens" in mlmodel.text

        downloaded = tmp_path / "downloaded"
        for run in (parent, *children):
            client.download_artifacts(run.info.run_id, "", str(downloaded / run.info.run_id))
        stored = [str(run.data.params) + str(run.data.tags) for run in (parent, *children)]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != config_path]  # the user's own file aside
    leaks = [p for p in written if password.encode() in p.read_bytes()]
    assert leaks == [] and password not in console and not any(password in text for text in stored)
    assert (tmp_path / "prefect-home").is_dir() and list(downloaded.rglob("plan.json"))  # the grep saw them
