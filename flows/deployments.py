"""The finetune flow as Prefect deployments: `<name>-manual` for UI and API triggers, `<name>-scheduled` on
the config's cron. Their default parameters are the loaded config, so the Prefect UI shows the pipeline.yaml
values in a form built from the schema (field descriptions included), and the server rejects a bad value.

The form opens on what a run changes (data, schedule, train, validation); run, model, pre-training and registry
follow, titled "More: ...". Tracking, deploy, advisor and run.output_dir are not in the form at all: the
deployment fixes them (SERVED_FIXED, SERVED_FIXED_FIELDS), and the server refuses a run that sends them. (The
v1 form cannot fold an object: a value of its JSON kind is refused in a deployment's own parameters, which the
server checks before hydrating them.)"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment, deploy
from prefect.schedules import Cron

from flows.finetune import finetune
from flows.pool import ensure_process_pool
from mixtune.core.config import SERVED_FIXED, SERVED_FIXED_FIELDS, PipelineConfig, form_schema, form_values
from mixtune.core.policy import ServedPolicy

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/finetune.py:finetune"
START_GRACE_S = 1800  # how long a submitted run may take to start before Prefect frees its concurrency slot


def one_at_a_time(collision: ConcurrencyLimitStrategy) -> ConcurrencyLimitConfig:
    """One flow run of a deployment at a time. A tick due while a run is still going is cancelled (CANCEL_NEW):
    the next tick sees the same new data, so ticks never queue up behind a long run. A manual run waits its
    turn (ENQUEUE): someone asked for it. The two deployments are counted apart; the champion decision itself
    is safe against any concurrent run (tasks/champion.py crown). A run holds its slot from submission, and
    Prefect revokes a slot whose run has not started within the grace period (300 s by default): on a loaded
    machine a run's process took longer than that to import torch and start, and was cancelled, so the grace
    is longer."""
    return ConcurrencyLimitConfig(limit=1, collision_strategy=collision, grace_period_seconds=START_GRACE_S)


def deployment_specs(config: PipelineConfig) -> list[dict]:
    values = {name: value for name, value in form_values(config).items() if name not in SERVED_FIXED}
    for section, names in SERVED_FIXED_FIELDS.items():
        values[section] = {name: value for name, value in values[section].items() if name not in names}
    common = {"parameters": {"config": values}, "tags": ["mixtune", config.run.name]}
    specs = [
        {
            "name": f"{config.deploy.name}-manual",
            **common,
            "description": "Run the pipeline now: change any field of the form, or none.",
            "concurrency_limit": one_at_a_time(ConcurrencyLimitStrategy.ENQUEUE),
        }
    ]
    if config.deploy.cron:
        specs.append(
            {
                "name": f"{config.deploy.name}-scheduled",
                **common,
                "schedules": [Cron(config.deploy.cron, timezone=config.deploy.timezone)],
                "concurrency_limit": one_at_a_time(ConcurrencyLimitStrategy.CANCEL_NEW),
                "description": f"Retrain on '{config.deploy.cron}' ({config.deploy.timezone}); a tick "
                "whose data did not change records 'no new data' and trains nothing.",
            }
        )
    return specs


def run_form(deployment: RunnerDeployment) -> RunnerDeployment:
    """Leaves the sections and fields the deployment fixes out of its run form. The schema allows no other
    property (the config forbids extra keys), so the server also refuses a run whose parameters send one."""
    definitions = deployment._parameter_openapi_schema.definitions
    for name in SERVED_FIXED:
        del definitions["PipelineConfig"]["properties"][name]
    for section, names in SERVED_FIXED_FIELDS.items():
        fields = definitions[definitions["PipelineConfig"]["properties"][section]["$ref"].split("/")[-1]]
        for name in names:
            del fields["properties"][name]
    form_schema({"properties": deployment._parameter_openapi_schema.properties})  # `name`: one box, no None switch
    return deployment


def serve_deployments(config: PipelineConfig, policy: ServedPolicy) -> None:
    """Blocks: this process polls the server and runs each flow run in a subprocess, which inherits the
    policy from this process's environment (a run's parameters cannot change it)."""
    os.environ.update(policy.to_env())
    # By module path, so the served runs import the installed package whatever folder serve started in.
    serve(
        *(
            run_form(finetune.to_deployment(entrypoint_type=EntrypointType.MODULE_PATH, **spec))
            for spec in deployment_specs(config)
        )
    )


def deploy_to_pool(config: PipelineConfig, pool: str, policy: ServedPolicy) -> list[str]:
    """For `prefect worker start --pool <pool>`: the worker runs the flow from this project folder, with the
    policy in the flow process's environment from the pool's locked job template (flows/pool.py), not from a
    job variable, which a run could override."""
    ensure_process_pool(pool, policy)
    source, specs = finetune.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINT), deployment_specs(config)
    deployments = [run_form(source.to_deployment(work_pool_name=pool, **spec)) for spec in specs]
    deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False)
    return [spec["name"] for spec in specs]
