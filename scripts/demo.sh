#!/usr/bin/env bash
# Set up (see setup.sh) and run the end-to-end demo on the embedded profile: no servers needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hotpath demo "$@"
