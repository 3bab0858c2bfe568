#!/usr/bin/env bash
# A team tracking server on loopback: SQL backend (SQLite by default, or any SQLAlchemy URI
# such as postgresql://user@localhost/mlflow) and a proxied artifact store.
#   mlflow/serve.sh                      # sqlite:///mlflow/mlflow.db, port 5000
#   BACKEND=postgresql://... PORT=5001 mlflow/serve.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
BACKEND="${BACKEND:-sqlite:///$here/mlflow.db}"
ARTIFACTS="${ARTIFACTS:-$here/artifacts}"
PORT="${PORT:-5000}"
MLFLOW="${MLFLOW:-$(dirname "$here")/.venv/bin/mlflow}"
exec "$MLFLOW" server --host 127.0.0.1 --port "$PORT" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
