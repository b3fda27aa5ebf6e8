"""The one-row int4 kernels as a Hopper GPU runs them, compiled here without one: Triton's interpreter (the other int4
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
def projections() -> dict[str, dict[str, dict]]:
    """`scripts/sass_int4_gemv.py --json --kernel K` for Llama-3.1-8B's projections, compiled (not interpreted) for
    sm_90: {K: {projection: figures}} of both kernels (dp4a: x rounded in the kernel, int8: read rounded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    found = {}
    for kernel in ("dp4a", "int8"):
        done = subprocess.run([sys.executable, str(SCRIPTS / "sass_int4_gemv.py"), "--json", "--kernel", kernel],
                              env=env, check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        found[kernel] = {r["projection"]: r for r in json.loads(done.stdout)}
    return found


@pytest.mark.parametrize("kernel", ["dp4a", "int8"])
@pytest.mark.parametrize("name", ["q/k/v", "o", "gate/up", "down"])
def test_each_default_tiling_compiles_for_sm_90_to_two_dp4a_a_word(projections: dict[str, dict[str, dict]], name: str,
                                                                   kernel: str) -> None:
    found = projections[kernel][name]
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


@pytest.mark.parametrize("name", ["q/k/v", "o", "gate/up", "down"])
def test_an_int8_input_leaves_a_step_less_to_do_that_is_not_from_the_weight_rows(projections: dict[str, dict[str, dict]],
                                                                                 name: str) -> None:
    """Reading x rounded by the kernel before (`int4_gemv_int8_kernel`) removes the rounding from every program's
    loop: fewer instructions a step at the same tiling, the saving in the part every program repeats."""
    rounding, reading = projections["dp4a"][name], projections["int8"][name]
    assert reading["tiling"] == rounding["tiling"]
    assert reading["instructions"] < rounding["instructions"]
    assert reading["fixed"] < 0.75 * rounding["fixed"], (reading["fixed"], rounding["fixed"])
