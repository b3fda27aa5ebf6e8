"""The slowest steps of concurrent streams in the engine a node serves, each timed alone (the GPU synchronised before
and after it) with what it computed: which steps set the time to first token under load.

Usage: python scripts/profile_steps_gpu.py [--shape llama-3.1-8b] [--rounds 1 8 8 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ringlet.cli.bench import load_bench_engine, stream_prompts, time_streams
from ringlet.cli.run import add_model_options
from ringlet.models.shapes import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 8, 8, 64], help="streams of each round")
    parser.add_argument("--show", type=int, default=3, help="slowest steps shown per round")
    args = parser.parse_args()
    if args.engine is None:
        args.engine = "cuda"
    engine, _, _ = load_bench_engine(args)
    engine.warmup()
    forward = engine.forward_batch
    steps_timed: list[tuple[float, int, int]] = []  # seconds, rows, tokens

    def timed(tokens: torch.Tensor, steps: Any) -> torch.Tensor:
        torch.cuda.synchronize()
        began = time.perf_counter()
        out = forward(tokens, steps)
        torch.cuda.synchronize()
        steps_timed.append((time.perf_counter() - began, len(steps), sum(s.count for s in steps)))
        return out

    engine.forward_batch = timed
    print(f"{args.shape}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, {torch.cuda.get_device_name()}")
    for streams in args.rounds:
        steps_timed.clear()
        result = time_streams(engine, stream_prompts(engine.tokenizer, args.prompt_tokens, streams), args.new_tokens)
        print(f"{streams:3d} streams: TTFT p50 {result['time_to_first_token_p50_ms']:.0f} ms, {len(steps_timed)} steps "
              f"taking {sum(t for t, _, _ in steps_timed) * 1000:.0f} ms; slowest:")
        for seconds, rows, tokens in sorted(steps_timed, reverse=True)[:args.show]:
            print(f"      {seconds * 1000:8.1f} ms  {rows} sequences, {tokens} tokens")


if __name__ == "__main__":
    main()
