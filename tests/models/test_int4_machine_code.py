"""The one-row int4 kernel as a Hopper GPU runs it, compiled here without one: Triton's interpreter (the other int4
tests) runs the kernels' plain-integer fallback, never the dp4a PTX, so this is where CI compiles the real code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringlet.models.kernels import int4_cuda
from tests.support.scripts import SCRIPTS

triton = pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; scripts/test.sh installs it")
pytestmark = pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump").is_file(),
                                reason="this Triton has no NVIDIA backend binaries (ptxas, cuobjdump)")


@pytest.fixture(scope="module")
def projections() -> dict[str, dict]:
    """`scripts/sass_int4_gemv.py --json` for Llama-3.1-8B's projections, compiled (not interpreted) for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPTS / "sass_int4_gemv.py"), "--json"], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["projection"]: r for r in json.loads(done.stdout)}


@pytest.mark.parametrize("name", ["q/k/v", "o", "gate/up", "down"])
def test_each_default_tiling_compiles_for_sm_90_to_two_dp4a_a_word(projections: dict[str, dict], name: str) -> None:
    found = projections[name]
    n, k = found["shape"]
    gated = name == "gate/up"
    assert found["tiling"] == vars(int4_cuda.gemv_tiling(n // 2 if gated else n, k, 128, gated))
    tiling, opcodes = found["tiling"], found["opcodes"]
    words = tiling["block_n"] * tiling["words"] * (2 if gated else 1) // (tiling["warps"] * 32)  # a thread's, a step
    assert found["weights"] == 8 * words
    assert opcodes["IDP"] == 2 * words, opcodes  # IDP.4A (dp4a): the low and the high nibbles of each word
    assert opcodes["BRA"] == 1, opcodes  # the loop's own branch: no part of a step is branched around
    assert 0 < found["fixed"] < found["instructions"]
    assert found["issue_bound_gbs"] > 0
