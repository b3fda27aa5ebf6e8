#!/usr/bin/env python
"""Decode tokens/s of the embedded model split over 1, 2 and 3 loopback stages, and the per-hop cost.

Each stage is its own process joined over torch.distributed (gloo), exactly as the runners of a CpuRing instance
are; the control plane is left out, since it carries no per-token traffic. Two numbers for the hop cost:
- derived: (1/tps(n) - 1/tps(1)) / n for a ring of n stages (n hops a token: n-1 hidden-state hops and the sampled
  token back to the first), which includes the wake-up of each process and each stage's own loop;
- measured: the median round trip of one decode step's hidden state ([1, 1, H] float32 plus its header) between
  two processes, halved.

With --pin every stage (and the single-stage run) uses one thread on a core of its own (rank modulo the cores): each
stage then computes as fast as it would alone on its own machine, so the derived figure is what the split costs,
not the stages competing for this machine's cores. Stages stay eager (not compiled) in both runs, as ring stages
are.

    python scripts/bench_cluster.py [--tokens 64] [--precision fp32] [--stages 1 2 3] [--pin] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from ringlet.master.placement import split_layers
from ringlet.shared.instances import BoundInstance, Instance, Shard
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.pipeline import FirstStage, RelayStage, RingAddress, host_store, join_store, load_for_stage
from ringlet.worker.supervisor import RING_OMP_SPINCOUNT

PROMPT = "Write a short story about a lighthouse keeper."
NUM_LAYERS = 30
HIDDEN = 576


def ring(stages: int) -> Instance:
    shards = [Shard(node_id=f"node-{rank}", rank=rank, start=start, end=end, num_layers=NUM_LAYERS)
              for rank, (start, end) in enumerate(split_layers(NUM_LAYERS, [1.0] * stages))]
    return Instance(instance_id=f"bench-{stages}", model="SmolLM2-135M-Instruct", instance_type="CpuRing",
                    shards=shards)


def first_stage(bound: BoundInstance, tokens: int, precision: str, repeats: int) -> None:
    store, address = host_store("127.0.0.1", len(bound.instance.shards))
    print(address.model_dump_json(), flush=True)
    stage, _ = load_for_stage(bound, precision)
    engine = FirstStage(bound, stage, store)
    engine.warmup()
    rates = []
    for _ in range(repeats):
        task = TextGenerationTask(prompt=PROMPT, max_tokens=tokens, ignore_eos=True,
                                  sampling=SamplingParams(temperature=0))
        last = list(engine.generate(task))[-1]
        assert last.timings is not None
        rates.append(last.timings.decode_tokens_per_s)
    print(json.dumps({"decode_tps": max(rates)}), flush=True)
    engine.close()


def pin(rank: int) -> None:
    """One thread, on core `rank` (modulo the cores this process may use)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)


def single_stage(tokens: int, precision: str, repeats: int, pinned: bool) -> float:
    from ringlet.worker.engines.torch.engine import TorchEngine

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    if pinned:
        pin(0)
    engine = TorchEngine.load(None, precision=precision, compile=False)  # eager, as ring stages are
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


def run_ring(stages: int, tokens: int, precision: str, repeats: int, pinned: bool) -> float:
    instance = ring(stages)
    bound = [BoundInstance(instance=instance, node_id=s.node_id).model_dump_json() for s in instance.shards]
    me = [sys.executable, __file__, "--precision", precision, "--tokens", str(tokens), "--repeats", str(repeats),
          *(["--pin"] if pinned else [])]
    env = {"GOMP_SPINCOUNT": str(RING_OMP_SPINCOUNT), **os.environ}  # as a node starts a ring's runners
    first = subprocess.Popen([*me, "--role", "first", bound[0]], stdout=subprocess.PIPE, text=True, env=env)
    assert first.stdout is not None
    address = first.stdout.readline().strip()
    others = [subprocess.Popen([*me, "--role", "relay", b, "--address", address], env=env) for b in bound[1:]]
    out, _ = first.communicate(timeout=600)
    for p in others:
        p.wait(timeout=60)
    if first.returncode != 0:
        raise SystemExit(f"the first stage of the {stages}-stage ring failed")
    return float(json.loads(out.splitlines()[-1])["decode_tps"])


def ping(rank: int, address: str, rounds: int) -> None:
    addr = RingAddress.model_validate_json(address)
    store = dist.TCPStore(addr.host, addr.port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    header, hidden = torch.zeros(3, dtype=torch.int64), torch.zeros(1, 1, HIDDEN)
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        if rank == 0:
            dist.send(header, 1)
            dist.send(hidden, 1)
            dist.recv(header, 1)
            dist.recv(hidden, 1)
        else:
            dist.recv(header, 0)
            dist.recv(hidden, 0)
            dist.send(header, 0)
            dist.send(hidden, 0)
        times.append(time.perf_counter() - began)
    if rank == 0:
        print(json.dumps({"round_trip_ms": statistics.median(times) * 1000}), flush=True)
    dist.destroy_process_group()


def measure_hop(rounds: int = 2000) -> float:
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    address = RingAddress(host="127.0.0.1", port=store.port).model_dump_json()
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "ping", str(rank), "--address", address,
                               "--rounds", str(rounds)], stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
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
    parser.add_argument("--role", choices=("first", "relay", "ping"), help=argparse.SUPPRESS)
    parser.add_argument("bound", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.pin and args.role in ("first", "relay"):
        pin(BoundInstance.model_validate_json(args.bound).shard.rank)
    if args.role == "first":
        return first_stage(BoundInstance.model_validate_json(args.bound), args.tokens, args.precision, args.repeats)
    if args.role == "relay":
        bound = BoundInstance.model_validate_json(args.bound)
        stage, _ = load_for_stage(bound, args.precision)
        address = RingAddress.model_validate_json(args.address)
        return RelayStage(bound, stage, join_store(address, len(bound.instance.shards))).serve()
    if args.role == "ping":
        return ping(int(args.bound), args.address, args.rounds)

    load = os.getloadavg()
    results: dict[str, object] = {"precision": args.precision, "tokens": args.tokens, "pinned": args.pin,
                                  "load_average_at_start": [round(x, 2) for x in load], "cpus": os.cpu_count()}
    tps = {}
    for stages in args.stages:
        tps[stages] = single_stage(args.tokens, args.precision, args.repeats, args.pin) if stages == 1 else \
            run_ring(stages, args.tokens, args.precision, args.repeats, args.pin)
        if not args.json:
            print(f"{stages} stage(s): {tps[stages]:.1f} decode tokens/s", flush=True)
    results["decode_tokens_per_s"] = tps
    if 1 in tps:
        results["derived_per_hop_ms"] = {n: round((1 / tps[n] - 1 / tps[1]) * 1000 / n, 3) for n in tps if n > 1}
    results["measured_hop_ms"] = round(measure_hop(), 4)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(results))
    else:
        for n, ms in dict(results.get("derived_per_hop_ms", {})).items():  # type: ignore[call-overload]
            print(f"per hop, derived from {n} stages: {ms:.3f} ms")
        print(f"per hop, measured ping-pong of a [1, 1, {HIDDEN}] hidden state: {results['measured_hop_ms']:.4f} ms")
        print(f"load average: {results['load_average_at_start']} at start, {results['load_average_at_end']} at end "
              f"({results['cpus']} CPUs)")


if __name__ == "__main__":
    main()
