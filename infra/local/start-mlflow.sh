#!/bin/sh
# Start a local MLflow tracking server on 127.0.0.1, in the foreground: runs in
# a sqlite file, artifacts in an S3 bucket (or a folder).
#
#   infra/local/start-mlflow.sh [DATA_DIR]      (default: ./.local/mlflow)
#
# Settings (environment): MLFLOW_PORT (5000), MLFLOW_ARTIFACTS (where artifacts
# go, default s3://pipeline/mlflow; needs the AWS_* variables that
# start-s3.sh prints), PYTHON (python3 with mlflow installed).
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
set -eu
DIR=${1:-./.local/mlflow}
PORT=${MLFLOW_PORT:-5000}
ARTIFACTS=${MLFLOW_ARTIFACTS:-s3://pipeline/mlflow}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
echo "MLflow server starting on http://127.0.0.1:$PORT (runs in $DIR/mlflow.db, artifacts in $ARTIFACTS)" >&2
# Job execution (MLflow 3's background job runner) costs about 2 GB of memory
# and nothing here uses it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true
exec ${PYTHON:-python3} -m mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
  --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "$ARTIFACTS"
