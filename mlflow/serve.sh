#!/usr/bin/env bash
# The team's MLflow tracking server on loopback: a SQL backend store and a proxied artifact store.
#   mlflow/serve.sh                                          # sqlite mlflow/mlflow.db + mlflow/artifacts, port 5000
#   BACKEND=postgresql+psycopg://mlflow:secret@127.0.0.1:5432/mlflow PORT=5001 mlflow/serve.sh
#   ARTIFACTS=s3://ml-artifacts/mlflow mlflow/serve.sh       # S3-compatible store (pip install boto3;
#                                                            #  MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 for MinIO)
# Then, in every shell that runs flows: export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT
# Artifacts travel through the server (mlflow-artifacts:/), so clients need no storage credentials.
# The stores reach `mlflow server` through its own environment variables (MLFLOW_BACKEND_STORE_URI,
# MLFLOW_ARTIFACTS_DESTINATION), never its command line: a database password there is readable by every
# user with `ps`. `lora-flow stack up` runs this script too (PORT/BACKEND/ARTIFACTS set) and stops it on `down`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
BACKEND="${BACKEND:-sqlite:///$here/mlflow.db}"
ARTIFACTS="${ARTIFACTS:-$here/artifacts}"
PORT="${PORT:-5000}"
WORKERS="${WORKERS:-2}"  # uvicorn worker processes, ~250 MB each; 2 suits a 2-core machine, raise it on a server
MLFLOW="${MLFLOW:-$(dirname "$here")/.venv/bin/mlflow}"
# MLflow 3's GenAI job runner (a job runner plus ~7 huey consumers) is unused here and doubles start-up time.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

die() { echo "mlflow/serve.sh: $*" >&2; exit 2; }
shown="$(sed -E 's#^([A-Za-z0-9+]+://[^:/@]*:)[^@]*@#\1***@#' <<<"$BACKEND")"  # the URI, password hidden
[[ "$PORT" =~ ^[0-9]+$ ]] && (( PORT > 0 && PORT < 65536 )) || die "PORT=$PORT is not a TCP port (1-65535)"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "WORKERS=$WORKERS is not a positive number of processes"
[[ -x "$MLFLOW" ]] || die "$MLFLOW not found; run 'make setup' or set MLFLOW=/path/to/mlflow"
case "$BACKEND" in
  sqlite:///*) [[ -d "$(dirname "${BACKEND#sqlite:///}")" ]] || die "BACKEND=$BACKEND: folder $(dirname "${BACKEND#sqlite:///}") does not exist" ;;
  postgresql://*|postgresql+*://*|mysql://*|mysql+*://*|mssql+*://*) ;;
  *) die "BACKEND=$shown is not a SQL database URI (sqlite:////abs/path.db or postgresql+psycopg://user:pw@127.0.0.1:5432/db)" ;;
esac
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  die "port $PORT is already in use on 127.0.0.1; pick another with PORT=..."
fi
[[ "$ARTIFACTS" == *://* ]] || mkdir -p "$ARTIFACTS"

export MLFLOW_BACKEND_STORE_URI="$BACKEND" MLFLOW_ARTIFACTS_DESTINATION="$ARTIFACTS"
exec "$MLFLOW" server --host 127.0.0.1 --port "$PORT" --workers "$WORKERS" --serve-artifacts
