#!/usr/bin/env bash
# Start the MLflow tracking server on the current kubectl context, in one command:
#   POSTGRES_PASSWORD=... MINIO_ROOT_PASSWORD=... MLFLOW_ADMIN_PASSWORD=... infra/mlflow/k8s/up.sh
# Creates (or updates) Secret mlflow/mlflow-secrets from those variables - the flask secret key is generated
# when MLFLOW_FLASK_SERVER_SECRET_KEY is unset - then applies mlflow.yaml. Nothing secret is written to disk.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

for name in POSTGRES_PASSWORD MINIO_ROOT_PASSWORD MLFLOW_ADMIN_PASSWORD; do
    if [[ -z "${!name:-}" || "${!name}" == *CHANGE_ME* ]]; then
        echo "up.sh: set $name (a real secret) in the environment" >&2
        exit 2
    fi
done
flask_key="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')}"

kubectl apply -f - <<NAMESPACE
apiVersion: v1
kind: Namespace
metadata:
  name: mlflow
NAMESPACE
kubectl -n mlflow create secret generic mlflow-secrets \
    --from-literal=postgres-password="$POSTGRES_PASSWORD" \
    --from-literal=minio-root-user="${MINIO_ROOT_USER:-mlflow-minio}" \
    --from-literal=minio-root-password="$MINIO_ROOT_PASSWORD" \
    --from-literal=mlflow-admin-password="$MLFLOW_ADMIN_PASSWORD" \
    --from-literal=flask-secret-key="$flask_key" \
    --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f "$here/mlflow.yaml"
echo "MLflow starting: kubectl -n mlflow rollout status deploy/mlflow; then kubectl -n mlflow port-forward svc/mlflow 5000"
