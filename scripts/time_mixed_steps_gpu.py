"""Time the steps that mix decodes with a prompt chunk on a CUDA GPU: the decodes alone (their CUDA graph), a chunk
alone, and both together on one CUDA graph (what the engine runs), as one eager step, or split into the decodes'
graph and an eager chunk (what the engine runs for a step longer than its largest graph).
Random weights of a model shape; prints milliseconds a step, the GPU synchronised around each run.

    python scripts/time_mixed_steps_gpu.py --shape llama-3.1-8b
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from ringlet.cli.bench import load_bench_engine
from ringlet.cli.run import add_model_options
from ringlet.models.paged_cache import SequenceStep
from ringlet.models.shapes import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    args.engine = args.engine or "cuda"
    engine, _, _ = load_bench_engine(args)
    engine.warmup()
    per_sequence = -(-args.max_context // engine.block_size)

    def sequence(i: int, start: int, count: int) -> SequenceStep:
        return SequenceStep(start, count, list(range(i * per_sequence, (i + 1) * per_sequence)))

    def timed(label: str, forward: Callable[[torch.Tensor, Sequence[SequenceStep]], torch.Tensor],
              steps: list[SequenceStep]) -> None:
        tokens = torch.randint(0, 1000, (sum(s.count for s in steps),))
        for _ in range(3):
            forward(tokens, steps)
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(args.runs):
            forward(tokens, steps)
        torch.cuda.synchronize()
        print(f"{label:36s} {(time.perf_counter() - began) / args.runs * 1000:8.2f} ms", flush=True)

    def split(tokens: torch.Tensor, steps: Sequence[SequenceStep]) -> torch.Tensor:
        return engine._forward_split(tokens, steps, [i for i, s in enumerate(steps) if s.count == 1])

    decodes = [sequence(i, 600, 1) for i in range(48)]
    chunk = [sequence(60, 0, 464)]  # with 48 decodes, the default step of 512 tokens
    print(f"{args.shape}, {torch.cuda.get_device_name()}, decodes at position 600, a 464-token prompt chunk")
    timed("48 decodes (CUDA graph)", engine.forward_batch, decodes)
    timed("48 decodes (eager)", engine._forward_eager, decodes)
    timed("464-token chunk (CUDA graph)", engine.forward_batch, chunk)
    timed("464-token chunk (eager)", engine._forward_eager, chunk)
    for n in (4, 16, 48):
        timed(f"{n} decodes + chunk, one CUDA graph", engine.forward_batch, decodes[:n] + chunk)
        timed(f"{n} decodes + chunk, one eager step", engine._forward_eager, decodes[:n] + chunk)
        timed(f"{n} decodes + chunk, split", split, decodes[:n] + chunk)


if __name__ == "__main__":
    main()
