#!/usr/bin/env python
"""Time one request's sampler per token over a vocabulary of the embedded model's size (49152), per setting.

    python scripts/bench_sampling.py [--device cpu|cuda] [--threads 1] [--vocab 49152]

Hot loop: the same logits every call, so the figures are the sampler's own cost, not the cache misses it meets
right after a forward (scripts/bench_cluster.py times those in place, on a ring's last stage).
"""

from __future__ import annotations

import argparse
import time

import torch

from ringlet.models.sampling import RequestSampler
from ringlet.shared.tasks import SamplingParams

SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "temperature 1 (the API's default)": SamplingParams(),
    "temperature 0.7, top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "temperature 0.7, top_k 40": SamplingParams(temperature=0.7, top_k=40),
    "greedy, repetition_penalty 1.1": SamplingParams(temperature=0, repetition_penalty=1.1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logits = torch.randn(1, args.vocab, generator=torch.Generator().manual_seed(0)).to(args.device) * 3
    for name, params in SETTINGS.items():
        sampler = RequestSampler(params, list(range(200)), args.vocab, args.device)
        for _ in range(20):
            sampler(logits)
        if args.device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(args.calls):
            token = sampler(logits)
        int(token)  # waits for the device
        print(f"{name:34s} {(time.perf_counter() - began) / args.calls * 1e6:8.1f} us a token")


if __name__ == "__main__":
    main()
