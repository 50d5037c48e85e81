#!/bin/sh
# Runs once, when the postgres image initialises an empty data volume: Prefect and MLflow each get
# their own database on the one server. Re-running needs a fresh volume (docker compose down -v).
# No `set -eu`: the image sources (rather than runs) this file when a checkout lost its exec bit,
# and -u would then leak into its entrypoint; `|| exit 1` stops the init either way.
for db in prefect mlflow; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE $db" || exit 1
done
