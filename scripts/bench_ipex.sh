#!/usr/bin/env bash
# IPEX's CPU backend against the CPU engine, same run, same machine: on the embedded model and on a
# random-weight checkpoint shaped like Llama-3.2-1B (written once under $TMPDIR/ringlet-bench, ~2.5 GB).
# Prints one table per model. Extra arguments go to scripts/bench_ipex.py (e.g. --new-tokens 32).
#
# BENCH_THREADS (default 1): torch threads. One thread makes "decode tok/CPU-s" a fair figure on a
# machine that others use too; on a quiet machine BENCH_THREADS=0 uses every core.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ipex.sh
PY="${RINGLET_IPEX_VENV:-.venv-ipex}/bin/python"
THREADS="${BENCH_THREADS:-1}"
if [[ "$THREADS" != 0 ]]; then export OMP_NUM_THREADS="$THREADS"; fi
export PYTHONWARNINGS=ignore TORCHINDUCTOR_COMPILE_THREADS=1  # IPEX's import would start a compile pool
quiet() {  # IPEX prints kernel-override warnings on import; the tables are what this script is for
    grep -vE "Overrid|operator:|registered at|dispatch key|kernel:|OperatorEntry|CUDA_HOME|BatchNorm folding" >&2
}
"$PY" scripts/bench_ipex.py --model embedded --threads "$THREADS" "$@" 2> >(quiet)
"$PY" scripts/bench_ipex.py --model llama-3.2-1b-random --threads "$THREADS" --prompt-tokens 64 --new-tokens 16 \
    --rounds 2 "$@" 2> >(quiet)
