"""Weight-only int4, int5 and int8 products on the CPU: PyTorch's kernels against ringlet's AVX-512 VNNI ones
(`models/kernels/cpu_vnni.cpp`), microseconds a product and GB/s of weight bytes, for a few rows of x.

Usage: python scripts/bench_cpu_kernels.py [--int4 3072x576 576x1536] [--int5 3072x576 576x1536] [--int8 49152x576]
       [--rows 1 2 4 8 ...]

int4 (groups of 32, as a Q4_0/Q4_1 file keeps them): `_weight_int4pack_mm_for_cpu`, ringlet's tiles, and the dense
bf16 matmul of the unpacked weight that long prompt chunks run. int5 (a GGUF file's Q5 tensors): the int8 rows that
PyTorch's kernel would run them as (a byte a weight), ringlet's 5-bit tiles, and the dense matmul; each column's GB/s
over the bytes it reads. int8 (a step a row): `_weight_int8pack_mm`, ringlet's tiles (and, at one row, its one-row
kernel over plain codes, which a weight whose shape is not whole tiles runs), and the dense bf16 matmul. Each
product runs over enough copies of the weight to fill `--bytes` (default 256 MB), one after the other, so that the
weights come from memory as in a decode step rather than from the cache of the last call. The largest difference
from PyTorch's kernel, relative to its largest output, is printed beside each row.
"""

import argparse
import time

import torch

from ringlet.models.kernels import cpu_vnni
from ringlet.models.quant import Int4Linear
from ringlet.models.quant_format import GroupQuantized, round_rows_int8


def seconds_each(call, weights: list, repeats: int = 3) -> float:
    """The best of `repeats` passes over every weight copy, per copy."""
    for weight in weights:  # warm-up
        call(weight)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for weight in weights:
            call(weight)
        best = min(best, time.perf_counter() - began)
    return best / len(weights)


def difference(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    return f"{((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item():.2%}"


def grouped_rows(shape: str, rows: list[int], budget: int, bits: int) -> None:
    """int4 (`bits` 4) against `_weight_int4pack_mm_for_cpu`, or 5-bit codes against the int8 rows PyTorch's kernel
    would run them as; both beside ringlet's tiles and the dense matmul."""
    n, k = map(int, shape.split("x"))
    group = 32
    layers = []
    for _ in range(max(1, budget * 2 // (n * k) if bits == 4 else budget // (n * k))):
        groups = GroupQuantized(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8),
                                torch.rand(n, k // group) * 0.02, torch.randn(n, k // group) * 0.02, group, bits)
        tiled = Int4Linear(groups, None, torch.bfloat16)
        if bits == 4:
            theirs = (torch._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1),)
        else:
            codes, step = round_rows_int8(groups.dequantize())
            theirs = (codes, step.bfloat16())
        layers.append((tiled, theirs))
    for m in rows:
        x = torch.randn(m, k).bfloat16()
        with torch.inference_mode():
            def pytorch(layer, x=x):
                tiled, theirs = layer
                if bits == 4:
                    return torch._weight_int4pack_mm_for_cpu(x, theirs[0], group, tiled.scale_zero)
                return torch._weight_int8pack_mm(x, *theirs)

            def ours(layer, x=x):
                tiled = layer[0]
                if bits == 4:
                    return torch.ops.ringlet_cpu.int4_linear(x, tiled.weight, tiled.scale_zero, group)
                return torch.ops.ringlet_cpu.int5_linear(x, tiled.weight, tiled.high, tiled.scale_zero, group)

            def dense(layer, x=x):
                return torch.nn.functional.linear(x, layer[0].dense_weight(x.dtype))

            seconds = [seconds_each(f, layers) for f in (pytorch, ours, dense)]
            gap = difference(ours(layers[0]), pytorch(layers[0]))
        # bytes each reads: int4 half a byte a code; 5-bit codes with a bf16 scale and zero per 32 against int8 rows
        held = (n * k / 2,) * 3 if bits == 4 else (n * k, n * k * 6 // 8, n * k * 6 // 8)
        print(f"| int{bits} {n} x {k} | {m} | " + " | ".join(f"{s * 1e6:.0f} ({b / s / 1e9:.1f})"
                                                            for s, b in zip(seconds, held, strict=True))
              + f" | {gap} |")


def int8_rows(shape: str, rows: list[int], budget: int) -> None:
    """ringlet's tiles; for one row also its one-row kernel over plain codes."""
    n, k = map(int, shape.split("x"))
    weights = [(codes := torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) * 0.01).bfloat16(),
                cpu_vnni.tile_int8(codes)) for _ in range(max(1, budget // (n * k)))]
    for m in rows:
        x = torch.randn(m, k).bfloat16()
        with torch.inference_mode():
            def pytorch(w, x=x):
                return torch._weight_int8pack_mm(x, w[0], w[1])

            def tiles(w, x=x):
                return torch.ops.ringlet_cpu.int8_tiled_linear(x, w[2], w[1])

            def one_row(w, x=x):
                return torch.ops.ringlet_cpu.int8_linear(x, w[0], w[1])

            def dense(w, x=x):
                return torch.nn.functional.linear(x, w[0].to(x.dtype) * w[1][:, None])

            seconds = [seconds_each(f, weights) for f in (pytorch, tiles, dense)]
            gap = difference(tiles(weights[0]), pytorch(weights[0]))
            print(f"| int8 {n} x {k} | {m} | " + " | ".join(f"{s * 1e6:.0f} ({n * k / s / 1e9:.1f})" for s in seconds)
                  + f" | {gap} |")
            if m == 1:
                alone = seconds_each(one_row, weights)
                gap = difference(one_row(weights[0]), pytorch(weights[0]))
                print(f"| int8 {n} x {k}, one-row kernel (plain codes) | 1 | | "
                      f"{alone * 1e6:.0f} ({n * k / alone / 1e9:.1f}) | | {gap} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int4", nargs="*", default=["3072x576", "576x1536"], help="int4 weights N x K")
    parser.add_argument("--int5", nargs="*", default=["3072x576", "576x1536"], help="5-bit weights N x K")
    parser.add_argument("--int8", nargs="*", default=["49152x576"],
                        help="int8 weights N x K (default: the embedded model's lm_head)")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 16, 64, 256])
    parser.add_argument("--bytes", type=int, default=256 << 20, help="weight bytes cycled through")
    args = parser.parse_args()
    if not cpu_vnni.available():
        raise SystemExit("ringlet's kernels are not available here (no AVX-512 VNNI, no compiler, or "
                         "RINGLET_CPU_VNNI=0)")
    print(f"threads: {torch.get_num_threads()}; microseconds a product (GB/s of weight bytes)")
    print("| weight | rows | PyTorch | ringlet (VNNI) | dense bf16 (unpacked) | largest difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.int4:
        grouped_rows(shape, args.rows, args.bytes, 4)
    for shape in args.int5:
        grouped_rows(shape, args.rows, args.bytes, 5)
    for shape in args.int8:
        int8_rows(shape, args.rows, args.bytes)


if __name__ == "__main__":
    main()
