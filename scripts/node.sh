#!/usr/bin/env bash
# Installs what is missing, then runs a ringlet node serving the embedded model on port 52415.
# Extra arguments go to `ringlet node` (see `ringlet node --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ringlet node "$@"
