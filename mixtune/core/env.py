"""Offline and telemetry defaults, applied before Prefect, MLflow or transformers are imported.

Every default is `setdefault`, so a user's own environment always wins.
"""

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    # No model hub at run time: base models come from local folders or presets.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per champion download floods flow logs
    # Telemetry reaches for the network, which is closed on the machines this runs on.
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's v2 UI initialises its analytics SDK (a third-party host) on load whatever the setting above
    # says; the v1 UI calls no analytics host. Only the UI a browser opens by default: `prefect server start`.
    "PREFECT_SERVER_UI_V2_ENABLED": "false",
    # The ephemeral Prefect server takes 11-19 s to start on 2 loaded cores; 20 s (the default) is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_UI_ENABLED": "true",
    # MLflow's client retries a request 7 times with backoff up to 120 s, each try waiting 120 s for an
    # answer: a tracking server that stays down held a run for ~13 minutes. With these, one request gives up
    # after at most 3 tries x 10 s + 1 s + 2 s of backoff = 33 s (a refused connection: 3 s).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # Terminal lines within 120 columns: Prefect's own prefix ("18:49:06.894 | INFO    | Task run 'x' - ") took
    # half of them. The Prefect UI shows the message alone either way.
    "PREFECT_LOGGING_FORMATTERS_STANDARD_FLOW_RUN_FMT": "%(asctime)s %(flow_run_name)s | %(message)s",
    "PREFECT_LOGGING_FORMATTERS_STANDARD_TASK_RUN_FMT": "%(asctime)s %(task_run_name)s | %(message)s",
}


def apply_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Keep Prefect's database and result storage out of the user's home unless they chose otherwise.
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
