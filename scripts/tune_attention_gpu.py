"""The CUDA batch engine's one-sequence decode step under each attention tiling, and its greedy pick against
torch.argmax.

Usage: python scripts/tune_attention_gpu.py [--shape llama-3.1-8b] [--precision int4] [--tiles 64:8 32:8 16:8]

Each TILE:JOIN sets `paged_decode.POSITIONS_PER_TILE` (cached positions a loop step of the attention reads) and
`fused_decode.JOIN_SPLITS` (splits the join reads a step), captures the step's graph again and generates greedily
from a 128-token and a 4,000-token prompt; after each, the graph of the last step is replayed back to back and the
best of three runs of 200 replays is printed in microseconds a step (the GPU's time: the serving loop's host work
comes on top). Random weights of the shape, as `ringlet bench --shape` builds them.
"""

import argparse
from collections import deque

import torch

from ringlet.cli import bench
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.engine_init import warmup_engine
from ringlet.worker.engines.torch import paged_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--tiles", nargs="+", default=["64:8", "32:8", "16:8"], metavar="TILE:JOIN")
    options = parser.parse_args()
    cli = argparse.ArgumentParser(prog="ringlet")
    bench.register(cli.add_subparsers(dest="command"))
    args = cli.parse_args(["bench", "--shape", options.shape, "--engine", "cuda", "--precision", options.precision,
                           "--max-context", "8192"])
    engine, _, _ = bench.load_bench_engine(args)
    warmup_engine(engine)
    step = engine.paged_decode
    if step is None:
        raise SystemExit("this engine decodes without the paged CUDA step: nothing to tune")
    tokenizer = engine.tokenizer
    prompts = {n: bench.prompt_text(tokenizer, n) for n in (128, 4000)}

    def step_us_after(prompt_tokens: int, new_tokens: int) -> float:
        task = TextGenerationTask(prompt=prompts[prompt_tokens], max_tokens=new_tokens, ignore_eos=True,
                                  sampling=SamplingParams(temperature=0))
        deque(engine.generate(task), maxlen=0)  # every chunk, none kept
        step.replay_ms(1, 20)
        return min(step.replay_ms(1, 200) for _ in range(3)) * 1000

    print(f"{options.shape} at {options.precision} on {torch.cuda.get_device_name()}: us a decode step")
    print(f"{'tile':>6}{'join':>6}{'at 256 positions':>18}{'at 4,064':>10}")
    for spec in options.tiles:
        tile, join = (int(v) for v in spec.split(":"))
        paged_decode.POSITIONS_PER_TILE, paged_decode.JOIN_SPLITS = tile, join
        step.graphs.clear()
        step.capture(1)
        print(f"{tile:>6}{join:>6}{step_us_after(128, 128):>18.1f}{step_us_after(4000, 64):>10.1f}", flush=True)

    logits, picked = step.logits[:1], step.picked[:1]
    torch_us = bench.cuda_graph_seconds([lambda: torch.argmax(logits, dim=-1, out=picked)]) * 1e6
    ours_us = bench.cuda_graph_seconds([lambda: paged_decode.greedy_picks(logits, picked, step.argmax_parts)]) * 1e6
    same = bool((picked == torch.argmax(logits, dim=-1)).all())
    print(f"greedy pick of {logits.shape[-1]:,} logits: torch.argmax {torch_us:.1f} us, greedy_picks {ours_us:.1f} us"
          f" (the same token: {same})")


if __name__ == "__main__":
    main()
