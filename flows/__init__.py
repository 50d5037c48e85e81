import mixtune.core  # noqa: F401  (offline and telemetry defaults before Prefect is imported)
