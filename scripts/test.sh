#!/usr/bin/env bash
# Installs what is missing, then runs every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export RINGLET_IPEX_VENV=${RINGLET_IPEX_VENV:-$HOME/.cache/ringlet/venv-ipex-2.8}
scripts/setup.sh --test
# the linters: any finding fails the run (set -e)
.venv/bin/ruff check ringlet tests scripts
.venv/bin/mypy ringlet
collected=$(.venv/bin/python -m pytest --collect-only -q "$@" 2>/dev/null | grep -cE '::' || true)
if [[ "$collected" -eq 0 ]]; then
  echo "test.sh: pytest collected no tests; refusing to report success" >&2
  exit 1
fi
exec .venv/bin/python -m pytest -ra "$@"
