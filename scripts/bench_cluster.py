#!/usr/bin/env python
"""Decode tokens/s of the embedded model split over 1, 2 and 3 loopback stages, and the per-hop cost.

Each stage is its own process joined over torch.distributed (gloo), exactly as the runners of a CpuRing instance
are; the control plane is left out, since it carries no per-token traffic. Numbers for the hop cost (a token
crosses n hops in a ring of n stages: n-1 hidden-state hops and the sampled token back to the first):
- per hop: every stage notes when its layers start and end in each decode step (one clock: the processes share a
  machine); a token's hops are the gaps from one stage's end to the next stage's start, and from the last stage's
  end to the first stage holding the sampled token: the transfers, each process's wake-up and loop, and the last
  stage's sampling. The median over the last generation's tokens, divided by n;
- the split's cost: the same less the last stage's sampling (from its layers' end to its send of the token), which
  a single node runs for every token too; the sampling and the last hop are printed alone as well;
- derived: (1/tps(n) - 1/tps(1)) / n, which also counts any change in how fast the layers run once split (caches,
  cores shared between stages), so on a small machine it can come out far above or below the per-hop figure;
- measured: the median round trip of one decode step's frame (its header and [1, 1, H] float32 hidden state, one
  message) between two processes, halved.

With --pin every stage (and the single-stage run) uses one thread on a core of its own (rank modulo the cores): each
stage then computes as fast as it would alone on its own machine, so the derived figure is what the split costs,
not the stages competing for this machine's cores. Stages stay eager (not compiled) in both runs, as ring stages
are.

    python scripts/bench_cluster.py [--tokens 64] [--precision fp32] [--stages 1 2 3] [--pin] [--json] [--model DIR]

--model: a model directory (config.json, safetensors, tokenizer.json) instead of the embedded model, e.g. a
random-weight checkpoint of the same shape on a machine without the embedded model's package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, ParamSpec, TypeVar

import torch
import torch.distributed as dist

from ringlet.master.placement import split_layers
from ringlet.models.catalog import card_from_path, embedded_card
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.net.ring import FRAME_HEADER_BYTES, host_store, join_store
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, Instance, Shard
from ringlet.shared.state import RingAddress
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.stages import FirstStage, RelayStage, load_for_stage
from ringlet.worker.supervisor import RING_OMP_SPINCOUNT

PROMPT = "Write a short story about a lighthouse keeper."


def model_shape(model: str | None) -> tuple[int, int]:
    """(layers, hidden size) of a model directory, or of the embedded model."""
    card = embedded_card() if model is None else card_from_path(model, Path(model))
    return card.num_layers, card.hidden_size


def ring(stages: int, model: str | None, layers: int) -> Instance:
    shards = [Shard(node_id=f"node-{rank}", rank=rank, start=start, end=end, num_layers=layers)
              for rank, (start, end) in enumerate(split_layers(layers, [1.0] * stages))]
    return Instance(instance_id=f"bench-{stages}", model=model or EMBEDDED_MODEL_ID, instance_type="CpuRing",
                    shards=shards)


P = ParamSpec("P")
R = TypeVar("R")


class Stopwatch(Generic[P, R]):
    """Wraps a callable and keeps when its calls began and ended, in seconds of the machine's monotonic clock
    (time.perf_counter), which every process on the machine shares; `keep(*args)` picks the calls to keep."""

    def __init__(self, call: Callable[P, R], keep: Callable[P, bool] | None = None) -> None:
        self.call, self.keep = call, keep
        self.spans: list[tuple[float, float]] = []

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        began = time.perf_counter()
        out = self.call(*args, **kwargs)
        if self.keep is None or self.keep(*args, **kwargs):
            self.spans.append((began, time.perf_counter()))
        return out

    def last(self, n: int) -> list[tuple[float, float]]:
        return self.spans[-n:]


def decode_steps(forward: Callable[[torch.Tensor, int], torch.Tensor]) -> Stopwatch[[torch.Tensor, int], torch.Tensor]:
    """A stage's forward(x, start), timed where it runs one position (the last prompt token, then every step)."""
    return Stopwatch(forward, keep=lambda x, start: x.shape[1] == 1)


def first_stage(bound: BoundInstance, tokens: int, precision: str, repeats: int) -> None:
    store, address = host_store("127.0.0.1", len(bound.instance.shards))
    print(address.model_dump_json(), flush=True)
    stage, _ = load_for_stage(bound, EngineConfig(precision=precision))
    engine = FirstStage(bound, stage, store)
    # the bench's own accounting: this stage's layers, and a whole decode step (layers, the ring, the token back)
    stage.forward = layers = decode_steps(stage.forward)  # type: ignore[method-assign,assignment]
    engine.generator.forward = step = decode_steps(engine.generator.forward)
    engine.warmup()
    rates = []
    for _ in range(repeats):
        task = TextGenerationTask(prompt=PROMPT, max_tokens=tokens, ignore_eos=True,
                                  sampling=SamplingParams(temperature=0))
        last = list(engine.generate(task))[-1]
        assert last.timings is not None
        rates.append(last.timings.decode_tokens_per_s)
    # the last generation's one-position forwards (its last prompt token, then every decode step) in every stage
    print(json.dumps({"decode_tps": max(rates), "layers": layers.last(tokens), "steps": step.last(tokens)}),
          flush=True)
    engine.close()


def pin(rank: int) -> None:
    """One thread, on core `rank` (modulo the cores this process may use)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)


def single_stage(tokens: int, precision: str, repeats: int, pinned: bool, model: str | None) -> float:
    from ringlet.worker.engines.torch.engine import TorchEngine

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    if pinned:
        pin(0)
    engine = TorchEngine.load(model, config=EngineConfig(precision=precision, cpu_compile=False))  # eager, as ring stages are
    engine.warmup()
    rates = []
    for _ in range(repeats):
        task = TextGenerationTask(prompt=PROMPT, max_tokens=tokens, ignore_eos=True,
                                  sampling=SamplingParams(temperature=0))
        last = list(engine.generate(task))[-1]
        assert last.timings is not None
        rates.append(last.timings.decode_tokens_per_s)
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    return max(rates)


def run_ring(stages: int, tokens: int, precision: str, repeats: int, pinned: bool,
             model: str | None, layers: int) -> dict[str, float]:
    """Decode tokens/s and, in ms, medians over the tokens of the last generation: per hop (a token's gaps between
    the stages, divided by the hops), the same without the last stage's sampling (which a single node runs too),
    the last hop alone (sampling, the token back to rank 0), and the sampling alone."""
    instance = ring(stages, model, layers)
    bound = [BoundInstance(instance=instance, node_id=s.node_id).model_dump_json() for s in instance.shards]
    me = [sys.executable, __file__, "--precision", precision, "--tokens", str(tokens), "--repeats", str(repeats),
          *(["--pin"] if pinned else [])]
    env = {"GOMP_SPINCOUNT": str(RING_OMP_SPINCOUNT), **os.environ}  # as a node starts a ring's runners
    first = subprocess.Popen([*me, "--role", "first", bound[0]], stdout=subprocess.PIPE, text=True, env=env)
    assert first.stdout is not None
    address = first.stdout.readline().strip()
    others = [subprocess.Popen([*me, "--role", "relay", b, "--address", address], env=env, stdout=subprocess.PIPE,
                               text=True) for b in bound[1:]]
    out, _ = first.communicate(timeout=600)
    relays = [json.loads(p.communicate(timeout=60)[0].splitlines()[-1]) for p in others]
    if first.returncode != 0 or any(p.returncode for p in others):
        raise SystemExit(f"a stage of the {stages}-stage ring failed")
    result = json.loads(out.splitlines()[-1])
    spans = [result["layers"], *(r["layers"] for r in relays)]  # per stage, per token: (start, end) of its layers
    sends = relays[-1]["sends"]
    gaps, back, sampling = [], [], []
    for token, (_, held) in enumerate(result["steps"]):
        back.append(held - spans[-1][token][1])  # the last stage's end to rank 0 holding the token
        sampling.append(sends[token][0] - spans[-1][token][1])
        gaps.append(back[-1] + sum(spans[i + 1][token][0] - spans[i][token][1] for i in range(stages - 1)))
    ms = {"hop": statistics.median(gaps) / stages,
          "split": statistics.median(g - s for g, s in zip(gaps, sampling)) / stages,
          "last_hop": statistics.median(back), "sampling": statistics.median(sampling)}
    return {"decode_tps": float(result["decode_tps"]), **{name: value * 1000 for name, value in ms.items()}}


def ping(rank: int, address: str, rounds: int, hidden_size: int) -> None:
    addr = RingAddress.model_validate_json(address)
    store = dist.TCPStore(addr.host, addr.port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    frame = torch.zeros(FRAME_HEADER_BYTES + 4 * hidden_size, dtype=torch.uint8)  # a ring frame: header + one hidden state
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        if rank == 0:
            dist.send(frame, 1)
            dist.recv(frame, 1)
        else:
            dist.recv(frame, 0)
            dist.send(frame, 0)
        times.append(time.perf_counter() - began)
    if rank == 0:
        print(json.dumps({"round_trip_ms": statistics.median(times) * 1000}), flush=True)
    dist.destroy_process_group()


def measure_hop(hidden_size: int, rounds: int = 2000) -> float:
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    address = RingAddress(host="127.0.0.1", port=store.port).model_dump_json()
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "ping", str(rank), "--address", address,
                               "--rounds", str(rounds), "--hidden", str(hidden_size)], stdout=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    out, _ = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=30)
    return float(json.loads(out.splitlines()[-1])["round_trip_ms"]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8", "int4", "auto"))
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pin", action="store_true", help="one thread per stage, each on a core of its own")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", help="a model directory (default: the embedded model)")
    parser.add_argument("--role", choices=("first", "relay", "ping"), help=argparse.SUPPRESS)
    parser.add_argument("bound", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2000, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.pin and args.role in ("first", "relay"):
        pin(BoundInstance.model_validate_json(args.bound).shard.rank)
    if args.role == "first":
        return first_stage(BoundInstance.model_validate_json(args.bound), args.tokens, args.precision, args.repeats)
    if args.role == "relay":
        bound = BoundInstance.model_validate_json(args.bound)
        stage, _ = load_for_stage(bound, EngineConfig(precision=args.precision))
        address = RingAddress.model_validate_json(args.address)
        stage.forward = layers = decode_steps(stage.forward)  # type: ignore[method-assign,assignment]
        relay = RelayStage(bound, stage, join_store(address, len(bound.instance.shards)))
        sends = Stopwatch(relay.ring.send)
        if relay.is_last:  # it sends nothing but sampled tokens: each send begins when its sampling has ended
            relay.ring.send = sends  # type: ignore[method-assign]
        relay.serve()
        print(json.dumps({"layers": layers.last(args.tokens), "sends": sends.last(args.tokens)}), flush=True)
        return None
    if args.role == "ping":
        return ping(int(args.bound), args.address, args.rounds, args.hidden)

    load = os.getloadavg()
    results: dict[str, object] = {"precision": args.precision, "tokens": args.tokens, "pinned": args.pin,
                                  "load_average_at_start": [round(x, 2) for x in load], "cpus": os.cpu_count()}
    num_layers, hidden = model_shape(args.model)
    tps, rings = {}, {}
    for stages in args.stages:
        if stages == 1:
            tps[stages] = single_stage(args.tokens, args.precision, args.repeats, args.pin, args.model)
        else:
            rings[stages] = run_ring(stages, args.tokens, args.precision, args.repeats, args.pin, args.model,
                                     num_layers)
            tps[stages] = rings[stages]["decode_tps"]
        if not args.json:
            print(f"{stages} stage(s): {tps[stages]:.1f} decode tokens/s", flush=True)
    results["decode_tokens_per_s"] = tps
    for name in ("hop", "split", "last_hop", "sampling"):
        results[f"{name}_ms"] = {n: round(ring[name], 3) for n, ring in rings.items()}
    if 1 in tps:
        results["derived_per_hop_ms"] = {n: round((1 / tps[n] - 1 / tps[1]) * 1000 / n, 3) for n in tps if n > 1}
    results["measured_hop_ms"] = round(measure_hop(hidden), 4)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(results))
    else:
        for n, ring in rings.items():
            print(f"per hop in {n} stages, the split's cost (a token's time between the stages' layers, less the "
                  f"last stage's sampling, which one node runs as well): {ring['split']:.3f} ms")
            print(f"  with the sampling: {ring['hop']:.3f} ms a hop; the last hop (sampling, the token back to the "
                  f"first stage) alone: {ring['last_hop']:.3f} ms; the sampling alone: {ring['sampling']:.3f} ms")
        for n, ms in dict(results.get("derived_per_hop_ms", {})).items():  # type: ignore[call-overload]
            print(f"per hop, derived from {n} stages against one: {ms:.3f} ms")
        print(f"per hop, measured ping-pong of a [1, 1, {hidden}] hidden state: {results['measured_hop_ms']:.4f} ms")
        print(f"load average: {results['load_average_at_start']} at start, {results['load_average_at_end']} at end "
              f"({results['cpus']} CPUs)")


if __name__ == "__main__":
    main()
