"""mixtune: staged domain/general mixing, SFT/LoRA and forgetting checks as a Prefect + MLflow pipeline."""

from mixtune import env as _env

_env.apply_defaults()

__version__ = "0.1.0"
