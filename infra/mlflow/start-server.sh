#!/bin/sh
# Start the MLflow tracking server with basic-auth. Every setting comes from the environment, so the same
# script serves docker compose, Kubernetes and tests/test_infra.py:
#   PGHOST PGPORT PGUSER PGPASSWORD   PostgreSQL holding the `mlflow` (tracking) and `mlflow_auth` databases
#   MLFLOW_AUTH_ADMIN_PASSWORD        admin password, set on first start (MLFLOW_AUTH_ADMIN_USERNAME: admin)
#   MLFLOW_FLASK_SERVER_SECRET_KEY    signs the auth app's sessions and CSRF tokens
#   MLFLOW_ARTIFACTS_DESTINATION      s3://BUCKET/PREFIX (with MLFLOW_S3_ENDPOINT_URL and AWS_* for MinIO) or a path
#   MLFLOW_ALLOWED_HOSTS              Host headers accepted, e.g. the Service name clients use (DNS-rebinding guard)
#   MLFLOW_HOST MLFLOW_PORT MLFLOW_WORKERS   where to listen (default 0.0.0.0:5000, 4 workers)
set -eu

require() {
    eval "value=\${$1:-}"
    if [ -z "$value" ]; then
        echo "start-mlflow-server: $1 must be set ($2)" >&2
        exit 2
    fi
    case "$value" in
        *CHANGE_ME*) echo "start-mlflow-server: $1 still holds the placeholder CHANGE_ME: set a real secret" >&2; exit 2 ;;
    esac
}
require PGHOST "PostgreSQL host"
require PGUSER "PostgreSQL user"
require PGPASSWORD "PostgreSQL password"
require MLFLOW_AUTH_ADMIN_PASSWORD "the MLflow admin password"
require MLFLOW_FLASK_SERVER_SECRET_KEY "a long random string"
require MLFLOW_ARTIFACTS_DESTINATION "where artifacts are stored"
for optional in MLFLOW_ALLOWED_HOSTS AWS_SECRET_ACCESS_KEY; do
    eval "value=\${$optional:-}"
    [ -z "$value" ] || require "$optional" "optional"
done

export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/etc/mlflow/basic_auth.ini}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"

exec mlflow server --app-name basic-auth \
    --backend-store-uri "postgresql+psycopg2:///${MLFLOW_DATABASE:-mlflow}" \
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:${MLFLOW_PORT:-5000},127.0.0.1,127.0.0.1:${MLFLOW_PORT:-5000}}"
