"""The core every layer stands on: config schema, caches, paths, logging, preflight. Imports nothing above it.

Importing it applies the offline and telemetry defaults, before Prefect, MLflow or transformers load."""

from mixtune.core import env as _env

_env.apply_defaults()
