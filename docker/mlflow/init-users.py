#!/usr/bin/env python3
"""The MLflow users of the stack, set from docker/.env by the one-shot mlflow-init service once the server
is healthy, and again on every `docker compose up`, which is how rotated passwords take effect:

* the admin, MLFLOW_ADMIN_USERNAME, which MLflow itself creates on its first start: checked to exist, be
  an admin and accept MLFLOW_ADMIN_PASSWORD. MLflow reads that password only when it creates the admin,
  so to change it set MLFLOW_ADMIN_PASSWORD_PREVIOUS to the password the server still has: this script
  then changes the admin's password to MLFLOW_ADMIN_PASSWORD.
* the worker, MLFLOW_WORKER_USERNAME, the user flow runs log as: created when missing, otherwise given
  MLFLOW_WORKER_PASSWORD (so editing it in docker/.env rotates it), and never an admin.
* what the worker logs to. The server's default_permission is NO_PERMISSIONS, and MLflow makes whoever
  creates an experiment or a registered model its MANAGE owner: the worker creates its experiments itself
  and reaches nothing else. Registered models are the exception: MLflow answers a non-admin's alias
  lookup on a model that does not exist with 403, not 404, so the pipeline's "is there a champion yet?"
  would fail its first run. Each of MLFLOW_WORKER_REGISTERED_MODELS (comma separated) is therefore
  created here, as the worker, which then owns it. Any of those or of MLFLOW_WORKER_EXPERIMENTS that
  already exists out of the worker's reach (made by someone else, e.g. by the admin in a stack where the
  worker used to log as admin) is granted to the worker with EDIT, no more.

Only MLflow's REST API and the standard library are used; no secret is printed.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

NAME = "mlflow-init"
MIN_PASSWORD = 12  # MLflow's own minimum; checked here so the message names the variable
TIMEOUT_S = 30.0
WAIT_S = float(os.environ.get("MLFLOW_INIT_WAIT_S", "120"))


class Refused(Exception):
    """A configuration or server state this script will not work around."""


def log(message: str) -> None:
    print(f"{NAME}: {message}", flush=True)


def setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise Refused(f"{name} is not set (docker/.env)")
    return value


class Api:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def call(
        self, method: str, path: str, user: tuple[str, str] | None, body: dict | None = None, query: dict | None = None
    ) -> tuple[int, dict]:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if user is not None:
            token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return response.status, parse(response.read())
        except urllib.error.HTTPError as err:
            return err.code, parse(err.read())

    def users(self, method: str, action: str, user: tuple[str, str], **kwargs) -> tuple[int, dict]:
        return self.call(method, f"/api/2.0/mlflow/users/{action}", user, **kwargs)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if self.call("GET", "/health", None)[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise Refused(f"MLflow at {self.base} did not answer /health within {WAIT_S:.0f} s")
            time.sleep(2)


def parse(raw: bytes) -> dict:
    try:
        found = json.loads(raw or b"{}")
    except ValueError:
        return {"message": raw.decode(errors="replace")[:300]}
    return found if isinstance(found, dict) else {}


def reason(status: int, body: dict) -> str:
    return f"HTTP {status}" + (f" ({body['message']})" if body.get("message") else "")


def ensure_admin(api: Api, admin: tuple[str, str], previous: str | None) -> None:
    status, body = api.users("GET", "get", admin, query={"username": admin[0]})
    if status == 401 and previous:
        old = (admin[0], previous)
        if api.users("GET", "get", old, query={"username": admin[0]})[0] == 200:
            # current_password: MLflow asks for it when users change their own password.
            status, body = api.users(
                "PATCH",
                "update-password",
                old,
                body={"username": admin[0], "password": admin[1], "current_password": previous},
            )
            if status != 200:
                raise Refused(f"MLflow would not change the admin's password: {reason(status, body)}")
            log(
                f"changed the password of MLflow admin '{admin[0]}' to MLFLOW_ADMIN_PASSWORD; "
                "now delete MLFLOW_ADMIN_PASSWORD_PREVIOUS from docker/.env"
            )
            status, body = api.users("GET", "get", admin, query={"username": admin[0]})
    if status == 401:
        raise Refused(
            f"MLflow refused MLFLOW_ADMIN_USERNAME/MLFLOW_ADMIN_PASSWORD for '{admin[0]}'"
            + (" and MLFLOW_ADMIN_PASSWORD_PREVIOUS" if previous else "")
            + ". MLflow sets the admin's password only when it creates the admin, on its first start: to "
            "change it, set MLFLOW_ADMIN_PASSWORD_PREVIOUS to the password the server has now."
        )
    if status != 200:
        raise Refused(f"could not read MLflow user '{admin[0]}': {reason(status, body)}")
    if not body.get("user", {}).get("is_admin"):
        raise Refused(f"MLflow user '{admin[0]}' (MLFLOW_ADMIN_USERNAME) is not an admin")


def ensure_worker(api: Api, admin: tuple[str, str], worker: tuple[str, str]) -> None:
    name = worker[0]
    status, body = api.users("GET", "get", admin, query={"username": name})
    if status == 404:
        status, body = api.users("POST", "create", admin, body={"username": name, "password": worker[1]})
        if status != 200:
            raise Refused(f"could not create MLflow user '{name}': {reason(status, body)}")
        log(f"created MLflow user '{name}' (not an admin)")
    elif status == 200:
        status, answer = api.users("PATCH", "update-password", admin, body={"username": name, "password": worker[1]})
        if status != 200:
            raise Refused(f"could not set the password of MLflow user '{name}': {reason(status, answer)}")
        if body.get("user", {}).get("is_admin"):
            status, answer = api.users("PATCH", "update-admin", admin, body={"username": name, "is_admin": False})
            if status != 200:
                raise Refused(f"could not take admin rights from MLflow user '{name}': {reason(status, answer)}")
            log(f"took admin rights from MLflow user '{name}': the worker must not be an admin")
        log(f"MLflow user '{name}' exists: password set from MLFLOW_WORKER_PASSWORD")
    else:
        raise Refused(f"could not look up MLflow user '{name}': {reason(status, body)}")
    # As the worker itself: its credentials work, and it is not an admin.
    status, body = api.users("GET", "get", worker, query={"username": name})
    if status != 200 or body.get("user", {}).get("is_admin") is not False:
        raise Refused(f"MLflow user '{name}' is not a working non-admin user: {reason(status, body)}")


def names(variable: str) -> list[str]:
    return [name.strip() for name in os.environ.get(variable, "").split(",") if name.strip()]


def grant(api: Api, admin: tuple[str, str], worker: str, resource_type: str, resource_id: str, label: str) -> None:
    # MLflow 3's per-user grant API; EDIT: read, log and update (new versions, aliases), but not delete or
    # manage permissions.
    status, body = api.call(
        "POST",
        "/api/3.0/mlflow/users/permissions/grant",
        admin,
        body={"username": worker, "resource_type": resource_type, "resource_id": resource_id, "permission": "EDIT"},
    )
    if status != 200:
        raise Refused(
            f"could not grant {label} to MLflow user '{worker}': {reason(status, body)}. "
            "Grant it EDIT in MLflow's UI (as the admin) or remove it from docker/.env"
        )
    log(f"granted EDIT on {label} to MLflow user '{worker}'")


def ensure_worker_reach(api: Api, admin: tuple[str, str], worker: tuple[str, str]) -> None:
    for name in names("MLFLOW_WORKER_EXPERIMENTS"):
        label = f"experiment '{name}'"
        query = {"experiment_name": name}
        status, body = api.call("GET", "/api/2.0/mlflow/experiments/get-by-name", worker, query=query)
        if status == 200 or status == 404:  # the worker's own, or not made yet: the worker's first run makes it
            continue
        status, body = api.call("GET", "/api/2.0/mlflow/experiments/get-by-name", admin, query=query)
        if status != 200:
            raise Refused(f"could not read {label}: {reason(status, body)}")
        grant(api, admin, worker[0], "experiment", body["experiment"]["experiment_id"], label)
    for name in names("MLFLOW_WORKER_REGISTERED_MODELS"):
        label = f"registered model '{name}'"
        if api.call("GET", "/api/2.0/mlflow/registered-models/get", worker, query={"name": name})[0] == 200:
            continue
        status, body = api.call("POST", "/api/2.0/mlflow/registered-models/create", worker, body={"name": name})
        if status == 200:
            log(f"created {label}, owned by MLflow user '{worker[0]}'")
        elif body.get("error_code") == "RESOURCE_ALREADY_EXISTS":
            grant(api, admin, worker[0], "registered_model", name, label)
        else:
            raise Refused(f"could not create {label} as MLflow user '{worker[0]}': {reason(status, body)}")


def main() -> int:
    try:
        uri = setting("MLFLOW_TRACKING_URI")
        admin = (setting("MLFLOW_ADMIN_USERNAME"), setting("MLFLOW_ADMIN_PASSWORD"))
        worker = (setting("MLFLOW_WORKER_USERNAME"), setting("MLFLOW_WORKER_PASSWORD"))
        previous = os.environ.get("MLFLOW_ADMIN_PASSWORD_PREVIOUS") or None
        if worker[0] == admin[0]:
            raise Refused(
                "MLFLOW_WORKER_USERNAME must differ from MLFLOW_ADMIN_USERNAME: "
                "the worker logs runs as a user without admin rights"
            )
        if worker[1] in (admin[1], previous):
            raise Refused("MLFLOW_WORKER_PASSWORD must differ from the admin's password")
        for key, value in (("MLFLOW_ADMIN_PASSWORD", admin[1]), ("MLFLOW_WORKER_PASSWORD", worker[1])):
            if len(value) < MIN_PASSWORD:
                raise Refused(f"{key} is shorter than {MIN_PASSWORD} characters, MLflow's minimum")
        api = Api(uri)
        api.wait_until_up()
        ensure_admin(api, admin, previous)
        ensure_worker(api, admin, worker)
        ensure_worker_reach(api, admin, worker)
    except Refused as err:
        print(f"{NAME}: {err}", file=sys.stderr, flush=True)
        return 1
    except (urllib.error.URLError, OSError) as err:
        print(f"{NAME}: MLflow at {os.environ.get('MLFLOW_TRACKING_URI')} unreachable: {err}", file=sys.stderr)
        return 1
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
