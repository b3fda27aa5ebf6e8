"""One-row (decode) weight-only int4 products on CUDA against the copy bandwidth: GB/s of weight bytes per kernel.

Usage: python scripts/bench_int4_gemv.py [--shape llama-3.1-8b] [--only gate down] [--sweep [--stages 1 2 3 4]
       [--blocks 8 16 32] [--words 32 64 128 256 512] [--warps 4 8] [--registers 0 48 64 80]] [--rows 128 512 ...]

For each projection of the shape's layer (q/k/v with the input's RMSNorm, o with the residual add, gate/up with the
norm and SiLU gate, down with the residual) and the int8 lm_head: the bf16 product (cuBLAS) and the int4 kernel
(`int4_gemv_dp4a_kernel`) at its default tiling, launched plainly and, on Hopper, with programmatic dependent
launch (as the decode step launches it, one after another); or at every tiling of a grid with --sweep (the eight
fastest; --blocks, --words, --warps and --registers narrow the grid, --only the projections, by the start of their
names). Each timing replays a CUDA graph that runs the product over enough copies of the weight to overflow the L2
cache, so the bytes come from device memory as in a decode step. The largest difference from an fp32 reference is
printed beside each int4 kernel. --rows also times the many-row products (a prompt chunk, a batch's decode step)
each way int4 runs them (the tile kernel, the weight dequantised for cuBLAS, up to GEMV_MAX_ROWS rows the dp4a rows
kernel) against cuBLAS on the bf16 weight, and the int8 lm_head's few-row products.
"""

import argparse
import functools
import itertools

import torch
import triton
from triton.runtime.errors import OutOfResources

from ringlet.cli.bench import copy_bandwidth
from ringlet.cli.bench import cuda_graph_seconds as graph_seconds
from ringlet.models.kernels import gemv_tuning, int4_cuda
from ringlet.models.quant_cuda import CudaInt4Linear, CudaInt8Linear
from ringlet.models.quant_format import GroupQuantized
from ringlet.models.random_checkpoint import shape_config
from ringlet.models.registry import model_args
from ringlet.models.shapes import decode_projections

ROTATE_BYTES = 512 << 20  # weight copies cycled through per replay: ten times the H200's 50 MB L2


def reference(x, weight, norm, eps, gated, residual_into):
    xf = x.float()
    if norm is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    y = xf @ weight.t()
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual_into is not None:
        y = y + residual_into.float()
    return y


def measure(name: str, n: int, inp: torch.Tensor, norm: torch.Tensor | None, eps: float, gated: bool,
            residual: bool, group_size: int, grid: list, bandwidth: float) -> list:
    """Prints one projection's bf16 and int4 speeds (int4 at each (tiling, PDL) of `grid`; empty: `launches`);
    returns the int4 timings, fastest first: (seconds, error, tiling, PDL)."""
    k = inp.shape[-1]
    out_n = n // 2 if gated else n
    weight = torch.randn(n, k, device=inp.device) * 0.02
    layer = CudaInt4Linear(GroupQuantized.round(weight, group_size), None, torch.bfloat16).to(inp.device)
    int4_bytes = layer.packed.numel() + 2 * layer.scale.numel() * 2
    layers = [layer] + [CudaInt4Linear(GroupQuantized.round(weight, group_size), None, torch.bfloat16)
                        for _ in range(min(64, max(1, ROTATE_BYTES // int4_bytes)) - 1)]
    start = torch.randn(1, out_n, dtype=torch.bfloat16, device=inp.device)
    expected = reference(inp, layer.dequantize(), norm, eps, gated, start if residual else None)
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16, device=inp.device)
            for _ in range(max(1, ROTATE_BYTES // (n * k * 2)))]
    seconds = graph_seconds([lambda w=w: torch.nn.functional.linear(inp, w) for w in bf16])
    print(f"\n{name}: W [{n}, {k}]; bf16 (cuBLAS, product alone) {n * k * 2 / seconds / 1e9:,.0f} GB/s "
          f"({n * k * 2 / seconds / bandwidth:.0%}), {seconds * 1e6:.1f} us")

    def project(lay: CudaInt4Linear, out: torch.Tensor, tiling: int4_cuda.GemvTiling, pdl: bool) -> None:
        int4_cuda._int4_gemv_rows(inp, lay.packed, lay.scale, lay.offset, lay.group_size, out, out_n, k, None, norm,
                                  eps, gated, residual, pdl, tiling)

    results = []
    default = int4_cuda.gemv_tiling(out_n, k, group_size, gated)
    for tiling, pdl in [(default, grid[0][1])] + grid if grid else launches(default, inp.device):
        out = start.clone()
        try:
            project(layer, out, tiling, pdl)
        except (triton.CompilationError, OutOfResources) as failure:  # a tiling the compiler or GPU refuses
            print(f"  {tiling}: {str(failure)[:120]}")
            continue
        error = (out.float() - expected).abs().max().item() / expected.abs().max().item()
        outs = [start.clone() for _ in layers]
        secs = graph_seconds([lambda lay=lay, o=o, t=tiling, p=pdl: project(lay, o, t, p)
                              for lay, o in zip(layers, outs)])
        results.append((secs, error, tiling, pdl))
    fastest = sorted(results, key=lambda r: r[0])
    for secs, error, tiling, pdl in fastest[:8] + ([results[0]] if grid else []):
        launch = ("PDL" if pdl else "plain launch") + (", the default" if grid and tiling == default else "")
        print(f"  int4 {int4_bytes / secs / 1e9:7,.0f} GB/s ({int4_bytes / secs / bandwidth:4.0%}) "
              f"{secs * 1e6:7.1f} us  error {error:.1e}  {launch}  {tiling}")
    return fastest


def launches(tiling: int4_cuda.GemvTiling, device: torch.device) -> list[tuple[int4_cuda.GemvTiling, bool]]:
    """The default tiling launched plainly, and on Hopper also with PDL (as the decode step launches it)."""
    if torch.cuda.get_device_capability(device)[0] < 9:
        return [(tiling, False)]
    return [(tiling, False), (tiling, True)]


def measure_rows(name: str, n: int, k: int, rows: list[int], group_size: int, device: torch.device) -> None:
    """Prints the many-row int4 products of W [n, k] (a prompt chunk, a batch's decode step) each way, the tile
    kernel, the weight dequantised for cuBLAS and (up to GEMV_MAX_ROWS rows) the dp4a rows kernel, against cuBLAS on
    the bf16 weight: TFLOP/s and us at each count of rows, from a CUDA graph of four products."""
    weight = torch.randn(n, k, device=device) * 0.02
    layer = CudaInt4Linear(GroupQuantized.round(weight, group_size), None, torch.bfloat16).to(device)
    dense = weight.bfloat16()
    print(f"\n{name}: W [{n}, {k}], many rows of x (TFLOP/s, us; int4 by cuBLAS from rows {int4_cuda.DENSE_FROM_ROWS})")
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
        reference = x.float() @ layer.dequantize().t()

        def tiles(x=x, out=out, m=m) -> None:
            int4_cuda.int4_matmul(x, layer.packed, layer.scale, layer.offset, group_size, out,
                                  config=int4_cuda.tiling(m, n, k, group_size))

        def dequantised(x=x, out=out) -> None:
            int4_cuda._dense_int4(x, layer.packed, layer.scale, layer.offset, group_size, out, n, None, None, 0.0,
                                  False, False)

        def gemv(x=x, out=out) -> None:
            int4_cuda.int4_matmul(x, layer.packed, layer.scale, layer.offset, group_size, out)

        line = []
        ways = [("bf16 cuBLAS", lambda x=x, out=out: torch.mm(x, dense.t(), out=out)), ("int4 tiles", tiles),
                ("int4 dequantised + cuBLAS", dequantised)]
        for label, call in ways + ([("int4 dp4a rows", gemv)] if 1 < m <= int4_cuda.GEMV_MAX_ROWS else []):
            call()
            error = (out.float() - reference).abs().max().item() / reference.abs().max().item()
            secs = graph_seconds([call] * 4)
            line.append(f"{label} {2 * m * n * k / secs / 1e12:5.1f} ({secs * 1e6:6.1f} us, error {error:.0e})")
        print(f"  {m:4d} rows: " + "; ".join(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4],
                        help="--sweep's pipeline depths of the weight loads (1: each step's loads wait in registers)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32], help="--sweep's weight rows a program")
    parser.add_argument("--words", type=int, nargs="+", default=[32, 64, 128, 256, 512],
                        help="--sweep's int32 words (8 codes) of a row a loop step")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="--sweep's warps a program")
    parser.add_argument("--registers", type=int, nargs="+", default=[0, 48, 64, 80],
                        help="--sweep's caps on a thread's registers (0: the compiler's choice)")
    parser.add_argument("--only", nargs="+", default=[],
                        help="only the projections whose names start with one of these (q/k/v, o, gate/up, down)")
    parser.add_argument("--rows", type=int, nargs="*", default=[],
                        help="also time the many-row products at these counts of rows (prompt chunks)")
    options = parser.parse_args()
    config = shape_config(options.shape)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    torch.manual_seed(0)
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device=device)
    x_inter = torch.randn(1, inter, dtype=torch.bfloat16, device=device)
    norm = (1 + 0.1 * torch.randn(hidden, device=device)).to(torch.bfloat16)
    eps = 1e-5
    projections = [  # name, rows, input, norm, gated, residual
        (name + " + norm" * normed + ", SiLU" * gated + " + residual" * residual, rows, x if k == hidden else x_inter,
         norm if normed else None, gated, residual)
        for name, rows, k, normed, gated, residual in decode_projections(model_args(config))
        if not options.only or name.startswith(tuple(options.only))]
    pdl = torch.cuda.get_device_capability(device)[0] >= 9

    def grid(k: int) -> list[tuple[int4_cuda.GemvTiling, bool]]:
        """The tilings --sweep tries on W [n, k]: those of the grid the kernel takes (`gemv_tuning.valid`: steps of
        words that divide a row into whole groups, at most 8,192 words a program's step, which spill registers)."""
        return ([(int4_cuda.GemvTiling(b, w, warps, stages, ahead, registers), pdl)
                 for b, w, warps, stages, ahead, registers in
                 itertools.product(options.blocks, options.words, options.warps, options.stages, (False, True),
                                   [r or None for r in options.registers])
                 if gemv_tuning.valid(int4_cuda.GemvTiling(b, w, warps, stages, ahead, registers), k,
                                      options.group_size)]
                if options.sweep else [])

    for name, n, inp, nrm, gated, residual in projections:
        measure(name, n, inp, nrm, eps, gated, residual, options.group_size, grid(inp.shape[-1]), bandwidth)
        torch.cuda.empty_cache()

    for name, n, inp, _, gated, _ in projections if options.rows else []:
        measure_rows(name.split(" ")[0], n, inp.shape[-1], options.rows, options.group_size, device)
        torch.cuda.empty_cache()

    vocab = config["vocab_size"]
    head = CudaInt8Linear(torch.randn(vocab, hidden, device=device) * 0.02, None, torch.bfloat16).to(device)
    out = torch.empty(1, vocab, dtype=torch.bfloat16, device=device)
    expected = reference(x, head.dequantize(), norm, eps, False, None)
    print(f"\nlm_head int8 [{vocab}, {hidden}] + norm (in L2 only in part: 4 replays)")
    kernels = [("dp4a rows", functools.partial(int4_cuda._int8_gemv_rows, pdl=False)),
               ("split-K float", functools.partial(int4_cuda._int8_gemv, pdl=False))]
    if pdl:
        kernels.append(("dp4a rows, PDL", functools.partial(int4_cuda._int8_gemv_rows, pdl=True)))
    for name, kernel in kernels:
        def call(kernel=kernel) -> None:
            kernel(x, head.weight, head.scale, out, vocab, hidden, None, norm, eps, False, False)
        call()
        error = (out.float() - expected).abs().max().item() / expected.abs().max().item()
        secs = graph_seconds([call] * 4)
        print(f"  {name}: {vocab * hidden / secs / 1e9:,.0f} GB/s ({vocab * hidden / secs / bandwidth:.0%}), "
              f"{secs * 1e6:.1f} us  error {error:.1e}")
    for m in [m for m in options.rows if 1 < m <= int4_cuda.INT8_GEMV_MAX_ROWS]:
        xs = torch.randn(m, hidden, dtype=torch.bfloat16, device=device)
        outs = torch.empty(m, vocab, dtype=torch.bfloat16, device=device)
        expected = reference(xs, head.dequantize(), norm, eps, False, None)
        for name, tiling in (("dp4a rows", None), ("tiles", int4_cuda.tiling(m, vocab, hidden, 0))):
            def rows_call(tiling=tiling, xs=xs, outs=outs) -> None:
                int4_cuda.int8_matmul(xs, head.weight, head.scale, outs, norm=norm, eps=eps, config=tiling)
            rows_call()
            error = (outs.float() - expected).abs().max().item() / expected.abs().max().item()
            secs = graph_seconds([rows_call] * 4)
            print(f"  {m} rows, {name}: {vocab * hidden / secs / 1e9:,.0f} GB/s, {secs * 1e6:.1f} us  "
                  f"error {error:.1e}")


if __name__ == "__main__":
    main()
