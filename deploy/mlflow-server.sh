#!/usr/bin/env bash
# The MLflow tracking server of the production profile: runs/registry in PostgreSQL, artifacts
# (models as safetensors weights + config, plots) on S3, proxied through the server so that
# clients need no S3 credentials. Point the pipeline at it with MLFLOW_TRACKING_URI=http://<host>:5000.
#
# Required: MLFLOW_PG_URL  e.g. postgresql+psycopg2://mlflow:<password>@postgres:5432/mlflow
#           MLFLOW_ARTIFACTS e.g. s3://comic-pipeline-mlflow/artifacts
# S3 credentials come from the usual AWS_* variables (or the pod's IAM role); MLFLOW_S3_ENDPOINT_URL
# for an S3-compatible store.
set -euo pipefail
: "${MLFLOW_PG_URL:?set MLFLOW_PG_URL (postgresql+psycopg2://user:pass@host:5432/mlflow)}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS (s3://bucket/prefix)}"
# MLflow 3.17 otherwise starts a job runner and 7 workers beside the server.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}" \
  --backend-store-uri "$MLFLOW_PG_URL" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --serve-artifacts
