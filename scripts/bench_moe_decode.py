"""One sparse layer's experts in a decode step on CUDA (routing, gate/up with SiLU, down with the weighted sum and the
residual add: `expert_kernels.moe_decode`) against the copy bandwidth: GB/s of the chosen experts' weight bytes.

Usage: python scripts/bench_moe_decode.py [--shape qwen3-30b-a3b] [--rows 1] [--precision bf16|int4] [--sweep]

Each timing replays a CUDA graph over 16 layers' worth of random bf16 experts, each layer with its own input (so its
own routing): a replay reads the chosen experts from device memory, as a decode step does. With --sweep, every tiling
of a grid for the two expert kernels (the eight fastest). The largest difference from the sparse layer's eager
forward (float32) is printed beside each; with --precision int4 (the experts rounded to 4 bits in groups of 128, as
--precision int4 loads them on CUDA), from the int4 layer's eager forward (an int4 linear per chosen expert).
"""

import argparse
import itertools

import torch

from ringlet.cli.bench import copy_bandwidth
from ringlet.cli.bench import cuda_graph_seconds as graph_seconds
from ringlet.models.config import ModelArgs
from ringlet.models.moe import SparseMoE
from ringlet.models.quant import quantize_experts_int4
from ringlet.models.quant_cuda import CUDA_GROUP_SIZE
from ringlet.models.random_checkpoint import shape_config
from ringlet.worker.engines.torch import expert_kernels
from ringlet.worker.engines.torch.expert_kernels import ExpertBuffers, moe_decode

LAYERS = 16


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--rows", type=int, default=1, help="sequences in the step")
    parser.add_argument("--precision", choices=["bf16", "int4"], default="bf16")
    parser.add_argument("--sweep", action="store_true")
    opts = parser.parse_args()
    args = ModelArgs.from_dict(shape_config(opts.shape))
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layers = [SparseMoE(args).to(device, dtype) for _ in range(LAYERS)]
    for moe in layers:
        moe.router.data *= 50
    int4 = opts.precision == "int4"
    if int4:
        for moe in layers:
            quantize_experts_int4(moe, dtype, CUDA_GROUP_SIZE)
    normed = [torch.randn(opts.rows, args.hidden_size, device=device, dtype=dtype) for _ in layers]
    hidden = [torch.zeros(opts.rows, args.hidden_size, device=device, dtype=dtype) for _ in layers]
    buffers = ExpertBuffers(layers[0], opts.rows, dtype, device)
    # the chosen experts' bytes for one row: bf16, or half a byte a weight and an fp16 scale and offset a group
    per_weight = 0.5 + 4 / CUDA_GROUP_SIZE if int4 else 2
    chosen = args.num_experts_per_tok * 3 * args.hidden_size * args.moe_intermediate_size * per_weight
    bandwidth = copy_bandwidth(device)
    print(f"{opts.shape}: {args.num_experts} experts, {args.num_experts_per_tok} a token, "
          f"{args.hidden_size}x{args.moe_intermediate_size}, {opts.precision}; {opts.rows} row(s); "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    def error(gate_up: dict, down: dict) -> float:
        if int4:
            want = layers[0](normed[0]).float()
        else:
            want = layers[0].float()(normed[0].float())
            layers[0].to(dtype)
        out = torch.zeros_like(hidden[0])
        moe_decode(layers[0], normed[0], out, buffers, gate_up, down)
        return ((out.float() - want).abs().max() / want.abs().max()).item()

    def measure(gate_up: dict, down: dict) -> float:
        return graph_seconds([lambda i=i: moe_decode(layers[i], normed[i], hidden[i], buffers, gate_up, down)
                              for i in range(LAYERS)])

    def report(seconds: float, gate_up: dict, down: dict) -> None:
        speed = (f"  {chosen / seconds / 1e9:6.0f} GB/s ({chosen / seconds / bandwidth:.0%} of copy)" if opts.rows == 1
                 else "")
        print(f"  {seconds * 1e6:7.1f} us{speed}  gate/up {gate_up}  down {down}  max error {error(gate_up, down):.2%}")

    gate_up, down = ((expert_kernels.INT4_GATE_UP_TILE, expert_kernels.INT4_DOWN_TILE) if int4
                     else (expert_kernels.GATE_UP_TILE, expert_kernels.DOWN_TILE))
    if not opts.sweep:
        report(measure(gate_up, down), gate_up, down)
        return
    grid = [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
            for n, k, w in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8))]
    # the gate/up kernel's tiling with the default down, then the down kernel's with the best gate/up
    for kernel in ("gate/up", "down"):
        results = []
        for tile in grid:
            pair = (tile, down) if kernel == "gate/up" else (gate_up, tile)
            try:
                results.append((measure(*pair), *pair))
            except Exception as e:  # noqa: BLE001  (a tiling Triton cannot build: reported, the sweep goes on)
                print(f"  {kernel} {tile}: {type(e).__name__}")
        results.sort(key=lambda r: r[0])
        print(f"{kernel} tilings, fastest first:")
        for result in results[:8]:
            report(*result)
        _, gate_up, down = results[0]

if __name__ == "__main__":
    main()
