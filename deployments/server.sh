#!/usr/bin/env bash
# `make server` / `make server-stop`: the local stack on 127.0.0.1 (Prefect server, MLflow
# server, Azurite). Usage: deployments/server.sh [start|stop|status]. See deployments/stack.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
cd "$ROOT"
exec "$PY" -m deployments.stack "${1:-start}"
