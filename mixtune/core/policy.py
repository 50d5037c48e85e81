"""What a served run may do. A deployment's flow runs take their whole config from whoever can reach the
Prefect API, so the serving side fixes two things a run's parameters cannot: which tracking servers get
the worker's MLflow credentials, and which folders the run may read. It also carries the sections a
deployment fixes (tracking, deploy, advisor: SERVED_FIXED) and the fields it fixes inside the others
(run.output_dir: SERVED_FIXED_FIELDS), which its run form leaves out. Local `mixtune run` is not confined.

`mixtune serve` puts the policy in the environment of the processes that run the flow (MIXTUNE_SERVED_POLICY);
`mixtune deploy` puts it in its work pool's job template, which a flow run cannot change (flows/pool.py). The
flow checks every deployment run against it before any request."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from mixtune.core.config import SERVED_FIXED, SERVED_FIXED_FIELDS, ConfigError, PipelineConfig, resolved_path
from mixtune.core.paths import tracking_uri
from mixtune.core.uris import split_credentials

POLICY_ENV = "MIXTUNE_SERVED_POLICY"


def same_server(a: str, b: str) -> bool:
    return split_credentials(a)[0].rstrip("/") == split_credentials(b)[0].rstrip("/")


class ServedPolicy(BaseModel):
    tracking_uris: list[str]  # servers a run may name in tracking.tracking_uri (credentials stripped)
    data_roots: list[str]  # folders a run may read sources and models from
    files: list[str] = []  # and exactly these: the served config's own inputs
    fixed: dict = {}  # the served config's SERVED_FIXED sections, credentials stripped: every run gets these
    fixed_fields: dict[str, dict] = {}  # and its SERVED_FIXED_FIELDS, by section: {"run": {"output_dir": ...}}

    @classmethod
    def for_served(cls, config: PipelineConfig, config_dir: Path) -> ServedPolicy:
        uris = [tracking_uri(config), *config.deploy.allowed_tracking_uris]
        roots = config.deploy.data_roots or [str(config_dir)]
        own = [path for _, path in input_files(config)]
        return cls(
            tracking_uris=[split_credentials(u)[0] for u in uris],
            data_roots=[str((config_dir / r).resolve()) for r in roots],
            files=[str(Path(p).resolve()) for p in own],
            fixed=fixed_sections(config),
            fixed_fields=fixed_fields(config),
        )

    def to_env(self) -> dict[str, str]:
        return {POLICY_ENV: self.model_dump_json()}


def fixed_sections(config: PipelineConfig) -> dict:
    fixed = {name: getattr(config, name).model_dump(mode="json") for name in SERVED_FIXED}
    if config.tracking.tracking_uri:
        fixed["tracking"]["tracking_uri"] = split_credentials(config.tracking.tracking_uri)[0]
    fixed["deploy"]["allowed_tracking_uris"] = [split_credentials(u)[0] for u in config.deploy.allowed_tracking_uris]
    return fixed


def fixed_fields(config: PipelineConfig) -> dict[str, dict]:
    return {
        section: {name: getattr(getattr(config, section), name) for name in names}
        for section, names in SERVED_FIXED_FIELDS.items()
    }


def served_policy(is_deployment_run: bool) -> ServedPolicy | None:
    """The serving side's policy; a deployment run without one gets the strictest: the worker's own
    tracking server, and the folder it runs in to read from and write under (./runs)."""
    if os.environ.get(POLICY_ENV):
        return ServedPolicy.model_validate(json.loads(os.environ[POLICY_ENV]))
    if not is_deployment_run:
        return None
    worker_uri = os.environ.get("MLFLOW_TRACKING_URI")
    here = Path.cwd().resolve()
    return ServedPolicy(
        tracking_uris=[worker_uri] if worker_uri else [],
        data_roots=[str(here)],
        fixed_fields={"run": {"output_dir": str(here / "runs")}},
    )


def enforce(config: PipelineConfig, policy: ServedPolicy) -> PipelineConfig:
    """The run's config with the deployment's fixed sections; refused, naming the field, if its parameters set
    one of those, or would send credentials elsewhere, or read outside its roots."""
    problems = fixed_problems(config, policy)
    if not problems:
        sections = {name: getattr(config, name).model_validate(value) for name, value in policy.fixed.items()}
        fields = {name: getattr(config, name).model_copy(update=v) for name, v in policy.fixed_fields.items()}
        config = config.model_copy(update={**sections, **fields})
        problems = tracking_problems(config, policy) + input_problems(config, policy)
    if problems:
        raise ConfigError("\n".join(["a served run's parameters were refused before any request:", *problems]))
    return config


def fixed_problems(config: PipelineConfig, policy: ServedPolicy) -> list[str]:
    """A section or field the deployment fixes may be absent from a run's parameters, or equal to the fixed one."""
    sections = [
        name
        for name in policy.fixed
        if name in config.model_fields_set and getattr(config, name).model_dump(mode="json") != policy.fixed[name]
    ]
    fields = [
        f"{section}.{name}"
        for section, values in policy.fixed_fields.items()
        for name, value in values.items()
        if name in getattr(config, section).model_fields_set and getattr(getattr(config, section), name) != value
    ]
    return [f"  {where}: fixed by the deployment; a run's parameters cannot set it" for where in sections + fields]


def tracking_problems(config: PipelineConfig, policy: ServedPolicy) -> list[str]:
    uri = config.tracking.tracking_uri
    if uri is None:
        return []
    if split_credentials(uri)[1] is not None:
        return [
            "  tracking.tracking_uri: credentials in a run's parameters are refused; the worker's environment "
            "holds them (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
        ]
    if any(same_server(uri, allowed) for allowed in policy.tracking_uris):
        return []
    allowed = ", ".join(policy.tracking_uris) or "(none: leave it unset)"
    return [
        f"  tracking.tracking_uri: {uri} is not a tracking server this deployment allows ({allowed}); "
        "see deploy.allowed_tracking_uris"
    ]


def input_files(config: PipelineConfig) -> list[tuple[str, str]]:
    """(field, path) of every file or folder the run reads; rehearsal prompts too, since the model's answers
    to them end up in MLflow."""
    inputs = [(f"data.sources.{i}.path", s.path) for i, s in enumerate(config.data.sources) if s.path]
    if config.data.self_rehearsal.prompts:
        inputs.append(("data.self_rehearsal.prompts", config.data.self_rehearsal.prompts))
    if config.model.path:
        inputs.append(("model.path", config.model.path))
    return inputs


def input_problems(config: PipelineConfig, policy: ServedPolicy) -> list[str]:
    return [
        f"  {field}: {path} is outside the folders this deployment may read ({', '.join(policy.data_roots)}); "
        "see deploy.data_roots"
        for field, path in input_files(config)
        if not readable(path, policy, field)
    ]


def readable(path: str, policy: ServedPolicy, field: str = "path") -> bool:
    # Symlinks and .. resolved: a link inside a root to a file outside is outside; a symlink loop is refused.
    real = resolved_path(Path(), path, field, "flow parameter config")
    return str(real) in policy.files or any(real.is_relative_to(root) for root in policy.data_roots)
