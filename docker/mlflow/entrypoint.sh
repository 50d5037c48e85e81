#!/bin/sh
# Writes MLflow's basic-auth config at start-up, from the environment, so no secret is baked into the
# image, then runs the command it was given (compose passes `mlflow server --app-name basic-auth ...`).
set -eu

: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?MLFLOW_AUTH_ADMIN_USERNAME is not set}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD is not set}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_FLASK_SERVER_SECRET_KEY is not set}"

# The password goes verbatim into database URLs (here and in compose) and into an ini file that
# configparser reads with %-interpolation: characters outside this set would corrupt either.
case "$POSTGRES_PASSWORD" in
  *[!A-Za-z0-9._~-]*)
    echo "mlflow-entrypoint: POSTGRES_PASSWORD may only use A-Z a-z 0-9 . _ ~ -" >&2
    exit 2 ;;
esac
case "$MLFLOW_AUTH_ADMIN_USERNAME" in
  *%*) echo "mlflow-entrypoint: MLFLOW_ADMIN_USERNAME may not contain %" >&2; exit 2 ;;
esac

export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
umask 077
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
# Users and permissions live in the mlflow database too (own alembic_version_auth table), so they
# survive a container rebuild. The admin password is not written here: MLflow reads it from
# MLFLOW_AUTH_ADMIN_PASSWORD, which also spares it configparser's % handling. MLflow only uses the
# admin settings to create the admin on first start; change the password later via the REST API.
# +psycopg2 as in compose: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed.
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://postgres:${POSTGRES_PASSWORD}@postgres:5432/mlflow
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

exec "$@"
