#!/usr/bin/env python
"""Time one request's sampler per token over a vocabulary of the embedded model's size (49152), per setting.

    python scripts/bench_sampling.py [--device cpu|cuda] [--threads 1] [--vocab 49152]

Hot loop: the same logits every call, so the figures are the sampler's own cost, not the cache misses it meets
right after a forward (scripts/bench_cluster.py times those in place, on a ring's last stage). The constrained
settings hold the output to a grammar (the embedded model's tokenizer): each call computes the grammar's mask, applies
it and advances the grammar by the token drawn; a finished answer starts a new request's sampler, outside the timing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ringlet.models.embedded import embedded_model_path
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.sampling import RequestSampler
from ringlet.shared.tasks import Constraint, SamplingParams

SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "temperature 1 (the API's default)": SamplingParams(),
    "temperature 0.7, top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "temperature 0.7, top_k 40": SamplingParams(temperature=0.7, top_k=40),
    "greedy, repetition_penalty 1.1": SamplingParams(temperature=0, repetition_penalty=1.1),
}
SCHEMA = Constraint(kind="json_schema", spec=json.dumps({
    "type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "maximum": 10**9},
                   "tags": {"type": "array", "items": {"enum": ["capital", "port", "old"]}, "maxItems": 3}}}))
CONSTRAINED = {
    "greedy, JSON schema": SamplingParams(temperature=0, constraint=SCHEMA),
    "temperature 0.7, top_p 0.9, JSON schema": SamplingParams(temperature=0.7, top_p=0.9, constraint=SCHEMA),
    "temperature 1, any JSON object": SamplingParams(constraint=Constraint(kind="json_object")),
    "temperature 1, regex": SamplingParams(constraint=Constraint(kind="regex", spec=r"[A-Z][a-z]{2,9}( [a-z]{1,8}){3}\.")),
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
        print(f"{name:40s} {(time.perf_counter() - began) / args.calls * 1e6:8.1f} us a token")
    tokenizer = GGUFModel(embedded_model_path()).tokenizer()
    g = torch.Generator().manual_seed(1)

    def answer(params: SamplingParams) -> tuple[float, int]:
        """Seconds in the sampler and tokens of one answer (cut at 200 tokens: a free string may run on)."""
        sampler = RequestSampler(params, list(range(200)), args.vocab, args.device, tokenizer)
        spent = 0.0
        for count in range(1, 201):
            step_logits = torch.randn(1, args.vocab, generator=g).to(args.device) * 3
            began = time.perf_counter()
            token = int(sampler(step_logits).item())
            spent += time.perf_counter() - began
            if token in tokenizer.eos_token_ids:
                break
        return spent, count

    for name, params in CONSTRAINED.items():
        answer(params)  # first calls: the grammar's lexer is built lazily
        spent, tokens, answers = 0.0, 0, 0
        while tokens < args.calls:
            seconds, count = answer(params)
            spent, tokens, answers = spent + seconds, tokens + count, answers + 1
        print(f"{name:40s} {spent / tokens * 1e6:8.1f} us a token ({tokens} tokens, {answers} answers)")


if __name__ == "__main__":
    main()
