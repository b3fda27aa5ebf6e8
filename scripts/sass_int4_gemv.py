"""The machine code of the one-row int4 kernel, read without a GPU: instructions a loop step and the issue bound.

Usage: python scripts/sass_int4_gemv.py [--shape llama-3.1-8b] [--arch 90] [--sms 132] [--clock-ghz 1.98]
                                        [--bandwidth-gbs 4240]

Compiles `int4_gemv_dp4a_kernel` as a decode step launches it (PDL, the default tiling of each projection of the
shape's layer) for the given compute capability with Triton's own ptxas, disassembles it with the cuobjdump that
Triton ships, finds the loop (the longest backward branch) and prints, per projection:
  - the instructions a thread issues in one loop step, and the weights it multiplies in that step;
  - how many of those instructions do not depend on the weight rows: the same tiling compiled at half the rows
    gives a straight line, instructions = fixed + per_row * rows (the fixed part rounds x to int8 and moves it
    between the threads' layouts, once a step in every program);
  - the issue bound: GB/s of weight bytes (codes and the fp16 scale and offset of each group) at which the SMs
    would do nothing but issue this loop (one warp instruction a clock in each of an SM's four schedulers), beside
    the copy bandwidth given (an H200's by default; `ringlet bench` prints the measured one).
The instructions depend on the Triton that compiles them: the line printed first names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ringlet.models.kernels import int4_cuda, int4_triton
from ringlet.models.random_checkpoint import shape_config
from ringlet.models.registry import model_args
from ringlet.models.shapes import decode_projections

GROUP = 128
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;")
_SIGNATURE = {"x_ptr": "*bf16", "words_ptr": "*i32", "scale_ptr": "*fp16", "offset_ptr": "*fp16", "out_ptr": "*bf16",
              "norm_ptr": "*bf16", "bias_ptr": "*bf16", "N": "i32", "K": "i32", "eps": "fp32"}


def loop_instructions(tiling: int4_cuda.GemvTiling, gated: bool, norm: bool, residual: bool,
                      arch: int) -> list[str]:
    """The instructions of the kernel's main loop (one step), as cuobjdump prints them."""
    constants = {"GROUP": GROUP, "BLOCK_N": tiling.block_n, "WORDS": tiling.words, "AHEAD": tiling.ahead,
                 "STAGES": tiling.stages, "NORM": norm, "GATED": gated, "BIAS": False, "RESIDUAL": residual,
                 "PDL": True, "ASM": True}
    kernel = int4_triton.int4_gemv_dp4a_kernel
    names = list(kernel.arg_names)
    signature = {name: "constexpr" if name in constants else _SIGNATURE[name] for name in names}
    # as a launch specialises them: tensors 16-byte aligned, the sizes (N, K) multiples of 16
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or name in ("N", "K")}
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()}, aligned)
    options = {"num_warps": tiling.warps, "num_stages": tiling.stages}
    if tiling.registers:
        options["maxnreg"] = tiling.registers
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        listing = subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True, text=True,
                                 check=True).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, listing.splitlines()) if m]
    loops = [(int(target, 16), at) for at, text in code
             for target in re.findall(r"BRA (0x[0-9a-f]+)", text) if int(target, 16) < at]
    if not loops:
        raise RuntimeError("no loop found in the kernel's machine code")
    first, last = max(loops, key=lambda span: span[1] - span[0])
    return [text for at, text in code if first <= at <= last]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def analyse(name: str, n: int, k: int, norm: bool, gated: bool, residual: bool, arch: int, sms: int,
            clock_ghz: float) -> dict[str, object]:
    """One projection's loop step at its default tiling (`--json` prints these)."""
    tiling = int4_cuda.gemv_tiling(n, k, GROUP, gated, sms)
    step = loop_instructions(tiling, gated, norm, residual, arch)
    half = loop_instructions(dataclasses.replace(tiling, block_n=tiling.block_n // 2), gated, norm, residual, arch)
    per_row = (len(step) - len(half)) / (tiling.block_n / 2)
    threads = tiling.warps * 32
    words = tiling.block_n * tiling.words * (2 if gated else 1) / threads  # a thread's, a step
    step_bytes = threads * words * (4 + 32 / GROUP)  # a program's: 4 bytes a word, 2 + 2 bytes a group
    bound = step_bytes / (tiling.warps * len(step)) * 4 * sms * clock_ghz  # GB/s at one warp instruction a clock
    return {"projection": name, "shape": [2 * n if gated else n, k], "tiling": dataclasses.asdict(tiling),
            "instructions": len(step), "weights": 8 * words, "fixed": len(step) - per_row * tiling.block_n,
            "per_row": per_row, "issue_bound_gbs": bound, "opcodes": dict(Counter(map(opcode, step)).most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="the SMs' clock (an H200's or H100's boost)")
    parser.add_argument("--bandwidth-gbs", type=float, default=4240, help="copy bandwidth to compare with")
    parser.add_argument("--json", action="store_true", help="one JSON list of the projections' figures")
    args = parser.parse_args()
    results = [analyse(name, rows // 2 if gated else rows, k, norm, gated, residual, args.arch, args.sms,
                       args.clock_ghz)
               for name, rows, k, norm, gated, residual in decode_projections(model_args(shape_config(args.shape)))]
    if args.json:
        print(json.dumps(results))
        return
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.sms} SMs at {args.clock_ghz} GHz; "
          f"int4 groups of {GROUP}, the default tilings of `int4_cuda.gemv_tiling`")
    for r in results:
        step, weights, fixed = r["instructions"], r["weights"], r["fixed"]
        bound = r["issue_bound_gbs"]
        print(f"\n{r['projection']} {r['shape']}, {int4_cuda.GemvTiling(**r['tiling'])}:")
        print(f"  a loop step: {step} instructions a thread for {weights:.0f} weights "
              f"({step / weights:.2f} a weight; the two dp4a of a word of 8 codes are 0.25)")
        print(f"  not from the rows: {fixed:.0f} a step ({fixed / step:.0%}); {r['per_row']:.1f} a weight row")
        print(f"  issue bound: {bound:,.0f} GB/s of weights, {bound / args.bandwidth_gbs:.0%} of "
              f"{args.bandwidth_gbs:,.0f} GB/s")
        print("  most issued: " + ", ".join(f"{op} {count}" for op, count in list(r["opcodes"].items())[:8]))


if __name__ == "__main__":
    main()
