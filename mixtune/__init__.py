"""mixtune: staged domain/general mixing, SFT/LoRA and forgetting checks as a Prefect + MLflow pipeline.

Layers, each importing only those below it: entry points (`mixtune.cli`, `mixtune.compare`) > `flows` >
`tasks` (stages, and the shared modules they use) > `mixtune.core`."""

import mixtune.core  # noqa: F401  (offline and telemetry defaults before Prefect is imported)

__version__ = "0.1.0"
