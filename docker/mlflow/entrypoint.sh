#!/bin/sh
# Writes MLflow's basic-auth config and the backend store URI at start-up, from the environment, so no
# secret is baked into the image or written on a command line, then runs the command it was given
# (compose passes `mlflow server --app-name basic-auth ...`, without --backend-store-uri).
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

# The tracking store, for `mlflow server` (its --backend-store-uri option reads this variable): as an
# argument, the password would show in `ps` and `docker inspect`'s command.
# +psycopg2 (the docker extra's driver): SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3.
export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://postgres:${POSTGRES_PASSWORD}@postgres:5432/mlflow"

export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
umask 077
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
# Users and permissions live in the mlflow database too (own alembic_version_auth table), so they
# survive a container rebuild. The admin password is not written here: MLflow reads it from
# MLFLOW_AUTH_ADMIN_PASSWORD, which also spares it configparser's % handling. MLflow only uses the
# admin settings to create the admin on first start; to change its password later, see
# MLFLOW_ADMIN_PASSWORD_PREVIOUS in docker/.env.example (the mlflow-init service applies it).
# NO_PERMISSIONS: a user sees only what it created (MLflow makes the creator of an experiment or
# registered model its MANAGE owner) or was granted; admins see everything. The worker's user is
# created by the mlflow-init service, not here.
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_BACKEND_STORE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

exec "$@"
