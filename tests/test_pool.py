"""The locked job template, as a process worker fills it (Prefect's own from_template_and_values): no job
variable a run sends changes the command, the environment or the working folder. The worker and server end
to end: tests/test_worker.py."""

import asyncio
from types import SimpleNamespace

import pytest
from prefect.workers.process import ProcessJobConfiguration

from flows.pool import env_variable, locked_template

POOL = "it-pool"
FIXED = {"MIXTUNE_SERVED_POLICY": '{"fixed": true}'}
PLACEHOLDER = f"prefect.variables.{env_variable(POOL)}"


class Variables:
    """The one API call a worker makes to fill this template: the Prefect Variable it names."""

    async def read_variable_by_name(self, name: str):
        return SimpleNamespace(value=FIXED) if name == env_variable(POOL) else None


def job(template: dict, job_variables: dict) -> ProcessJobConfiguration:
    return asyncio.run(ProcessJobConfiguration.from_template_and_values(template, job_variables, client=Variables()))


@pytest.mark.parametrize(
    "job_variables",
    [
        {"command": "sh -c 'touch MARKER'"},
        {"env": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}},
        {"env": {"MIXTUNE_SERVED_POLICY": "{}"}},
        {"env.MIXTUNE_SERVED_POLICY": "{}"},
        {PLACEHOLDER: {"MIXTUNE_SERVED_POLICY": "{}"}},
        {"prefect": {"variables": {env_variable(POOL): {}}}},
        {"working_dir": "/tmp", "stream_output": False},
    ],
)
def test_a_runs_job_variables_change_nothing(job_variables):
    filled = job(locked_template(POOL), job_variables)
    assert (filled.command, filled.env, filled.working_dir, filled.stream_output) == (None, FIXED, None, True)


def test_a_literal_environment_would_not_hold():
    """Why the environment comes from a Prefect Variable: a worker merges a run's `env` over the template's."""
    template = locked_template(POOL)
    template["job_configuration"]["env"] = dict(FIXED)
    assert job(template, {"env": {"MIXTUNE_SERVED_POLICY": "{}"}}).env == {"MIXTUNE_SERVED_POLICY": "{}"}


def test_env_variable_names_are_what_prefect_accepts_and_differ_per_pool():
    names = {env_variable(pool) for pool in ("mixtune", "Mixtune", "my pool/1", "my_pool_1")}
    assert len(names) == 4 and all(n.replace("_", "").replace("-", "").isalnum() for n in names)
