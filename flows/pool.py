"""The process work pool of `mixtune deploy`, with a base job template that a flow run cannot steer.

A process worker builds each run's job from its pool's base job template, filled with the deployment's job
variables and then the flow run's own, which any API client (and the UI form's "Job Variables" field) sets.
Prefect's default template hands them the command and the environment: a run's `env` could point
MLFLOW_TRACKING_URI at another server (the worker's credentials go with it) or replace the served policy.

This template declares no variables, so the server refuses a run that sends any (HTTP 422), and nothing in its
job configuration is filled from one, so a run that reaches the worker another way (POST /flow_runs/ is not
checked) still changes nothing. There is no command: the worker runs its own Prefect engine. The environment
comes from a Prefect Variable the template names: a literal one would not do, since the worker merges a
run's `env` over the template's (prefect/workers/base.py, from_template_and_values). The worker's own
environment (its MLFLOW_TRACKING_URI and credentials) reaches every run unchanged."""

from __future__ import annotations

import hashlib
import json
import re

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate, WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectAlreadyExists
from prefect.types import MAX_VARIABLE_VALUE_LENGTH

from mixtune.core.policy import POLICY_ENV, ServedPolicy


class PoolRefused(Exception):
    """The pool cannot take these deployments; the message says why and what to do."""


def env_variable(pool: str) -> str:
    """The Prefect Variable holding the environment of the pool's flow runs (Variable names: [A-Za-z0-9_-])."""
    slug = re.sub(r"[^a-z0-9_]", "_", pool.lower())[:40]
    return f"mixtune_pool_env_{slug}_{hashlib.sha256(pool.encode()).hexdigest()[:8]}"


def locked_template(pool: str) -> dict:
    """The server wants every placeholder declared as a variable, the Prefect Variable's too: it is declared with
    a schema no value satisfies, and a worker never fills a `prefect.variables.` placeholder from job variables."""
    placeholder = f"prefect.variables.{env_variable(pool)}"
    fixed = {"title": "Environment (fixed)", "description": "Set by `mixtune deploy`; no run may set it.", "not": {}}
    return {
        "job_configuration": {"env": "{{ " + placeholder + " }}", "stream_output": True},
        "variables": {"type": "object", "properties": {placeholder: fixed}, "additionalProperties": False},
    }


def ensure_process_pool(pool: str, policy: ServedPolicy) -> None:
    """Creates the pool, or locks an existing one, and stores the policy its runs get. One pool serves one
    pipeline's deployments (one deploy.name): the policy is the pool's, not each deployment's."""
    env = policy.to_env()
    if len(json.dumps(env)) > MAX_VARIABLE_VALUE_LENGTH:
        raise PoolRefused(
            f"the served policy is over Prefect's {MAX_VARIABLE_VALUE_LENGTH:,}-character limit for a Variable: "
            "name fewer input files, deploy.data_roots or deploy.allowed_tracking_uris (a folder covers many files)"
        )
    with get_client(sync_client=True) as client:
        stored = client.read_variable_by_name(env_variable(pool))
        serving = ServedPolicy.model_validate_json(stored.value[POLICY_ENV]).fixed["deploy"]["name"] if stored else None
        if serving not in (None, policy.fixed["deploy"]["name"]):  # another config's runs would get this policy
            raise PoolRefused(
                f"work pool {pool!r} runs the deployments of deploy.name {serving!r}, under that config's policy; "
                f"give this one its own pool (--pool)"
            )
        if stored:
            client.update_variable(VariableUpdate(name=env_variable(pool), value=env))
        else:
            client.create_variable(VariableCreate(name=env_variable(pool), value=env))
        lock_pool(client, pool)


def lock_pool(client, pool: str) -> None:
    try:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=locked_template(pool)))
    except ObjectAlreadyExists:
        if client.read_work_pool(pool).type != "process":
            raise PoolRefused(f"work pool {pool!r} exists and is not a process pool; name another (--pool)") from None
        client.update_work_pool(pool, WorkPoolUpdate(base_job_template=locked_template(pool)))
