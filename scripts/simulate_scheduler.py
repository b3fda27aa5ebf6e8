"""The scheduler's policy under a modelled step cost, without a model or a GPU: N clients send prompts (all at once,
then each as its last request ends, optionally after a random think time), the real `Scheduler` plans every step,
a clock advances by what the step would cost, and the script prints the inter-token and time-to-first-token
percentiles that clients would see. A tool to weigh a scheduling change before measuring it on a GPU; the numbers
it prints are modelled, not measured.

The default cost is an 8B model on an H200 as `scripts/bench_gpu.py --shape llama-3.1-8b --streams 1 8 32 64`
measured it: a decode step of 4.2 ms alone and 6.6 ms at 64 streams, and about 28 us for each prompt token a step
fills (27k prompt tokens a second).

    .venv/bin/python scripts/simulate_scheduler.py --clients 64 --requests-per-client 6 --think-ms 500
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from ringlet.worker.blocks import BlockManager
from ringlet.worker.scheduler import Planned, Scheduler, Sequence


@dataclass(frozen=True)
class StepCost:
    alone: float = 0.0042  # seconds: a step decoding one sequence
    full: float = 0.0066  # a step decoding `full_batch` sequences
    full_batch: int = 64
    per_prompt_token: float = 0.000028  # each prompt token a step fills

    def __call__(self, planned: list[Planned[tuple[int, int]]]) -> float:
        decodes = sum(1 for p in planned if p.samples)
        filled = sum(p.count for p in planned) - decodes
        share = min(decodes, self.full_batch) / self.full_batch
        return self.alone + (self.full - self.alone) * share + self.per_prompt_token * filled


@dataclass
class Result:
    gaps: list[float]  # seconds between a stream's consecutive tokens, every stream's
    ttft: list[float]  # seconds from a request's arrival to its first token
    seconds: float  # until the last request ended

    @staticmethod
    def percentile(values: list[float], fraction: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def simulate(burst_pause: float, clients: int = 64, requests_per_client: int = 1, think: float = 0.0,
             prompt_tokens: int = 512, new_tokens: int = 128, max_step_tokens: int = 512,
             cost: Callable[[list[Planned[tuple[int, int]]]], float] = StepCost(), seed: int = 0) -> Result:
    rng = random.Random(seed)
    now = 0.0
    scheduler: Scheduler[tuple[int, int]] = Scheduler(BlockManager(num_blocks=1 << 16, block_size=16),
                                                      max_step_tokens, clients, burst_pause, clock=lambda: now)
    arrivals = [(rng.expovariate(1 / think) if think else 0.0, client, 0) for client in range(clients)]
    heapq.heapify(arrivals)
    arrived: dict[str, float] = {}
    tokens_at: dict[str, list[float]] = {}
    ended = 0
    while ended < clients * requests_per_client:
        while arrivals and arrivals[0][0] <= now:
            at, client, number = heapq.heappop(arrivals)
            seq_id = f"{client}-{number}"
            prompt = [rng.randrange(1, 50_000) for _ in range(prompt_tokens)]
            scheduler.add(Sequence(seq_id, prompt, prompt_tokens, (client, number)))
            arrived[seq_id], tokens_at[seq_id] = at, []
        planned = scheduler.plan()
        if not planned:
            now = arrivals[0][0]
            continue
        now += cost(planned)
        scheduler.computed(planned)
        for entry in planned:
            if not entry.samples:
                continue
            sequence = entry.sequence
            sequence.tokens.append(1)
            tokens_at[sequence.seq_id].append(now)
            if sequence.generated == new_tokens:
                scheduler.remove(sequence.seq_id)
                ended += 1
                client, number = sequence.state
                if number + 1 < requests_per_client:
                    heapq.heappush(arrivals, (now + (rng.expovariate(1 / think) if think else 0.0), client,
                                              number + 1))
    gaps = [b - a for times in tokens_at.values() for a, b in itertools.pairwise(times)]
    ttft = [times[0] - arrived[seq_id] for seq_id, times in tokens_at.items()]
    return Result(gaps, ttft, now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--think-ms", type=float, default=0.0, help="mean random wait before each request")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-step-tokens", type=int, default=512)
    parser.add_argument("--burst-pause-ms", type=float, nargs="+", default=[0, 250])
    args = parser.parse_args()
    print(f"modelled: {args.clients} clients x {args.requests_per_client} request(s), prompts of {args.prompt_tokens} "
          f"tokens, {args.new_tokens} new, think time {args.think_ms:g} ms, {args.max_step_tokens} tokens a step")
    print(f"{'pause ms':>9} {'ITL p50':>8} {'ITL p95':>8} {'ITL max':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'seconds':>8}"
          "   (times in ms)")
    single = simulate(0.0, clients=1, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    for pause in args.burst_pause_ms:
        result = simulate(pause / 1000, args.clients, args.requests_per_client, args.think_ms / 1000,
                          args.prompt_tokens, args.new_tokens, args.max_step_tokens)
        p = Result.percentile
        print(f"{pause:>9g} {1000 * p(result.gaps, 0.5):>8.1f} {1000 * p(result.gaps, 0.95):>8.1f} "
              f"{1000 * max(result.gaps):>8.1f} {1000 * p(result.ttft, 0.5):>9.0f} {1000 * p(result.ttft, 0.95):>9.0f} "
              f"{result.seconds:>8.2f}")
    print(f"one stream alone: ITL p95 {1000 * Result.percentile(single.gaps, 0.95):.1f} ms")


if __name__ == "__main__":
    main()
