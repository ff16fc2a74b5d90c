#!/usr/bin/env bash
# Set up (with redis-server and the local Triton) and run lint plus the whole test suite.
# The tests start their own redis-server and tritonserver on free loopback ports, and Spark
# in local mode, and stop them after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-redis --with-triton
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
