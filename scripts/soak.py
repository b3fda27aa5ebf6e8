"""Soak: N concurrent chat clients against one node, or a cluster of two (requests to both; the second forwards
its share to the first, which holds the instance), for a set time. Each request is at random a whole stream, a
stream the client drops after a few chunks (a disconnect), or a non-streaming request the client gives up on
(a cancel). Prints requests, errors other than the deliberate ones, latencies, the nodes' memory (node and
runners) over time, and what the nodes still hold afterwards. Prints numbers; judges nothing.

    .venv/bin/python scripts/soak.py --duration 300 --clients 64
    .venv/bin/python scripts/soak.py --cluster --duration 300 --clients 64
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:52415 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
from bench_serving import free_port, machine  # this directory's serving benchmark (run as scripts/soak.py)

from ringlet.net.trust import CLUSTER_KEY_ENV, token_of

QUESTION = "Tell me about the history of bread, in a few sentences."
SAMPLE_EVERY_S = 10.0


@dataclass
class Node:
    name: str
    url: str
    pid: int
    process: subprocess.Popen[bytes] | None = None
    memory: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, MB of node + runners)


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)  # completed, disconnected, cancelled, error
    errors: Counter[str] = field(default_factory=Counter)  # the first words of each error
    latencies: list[float] = field(default_factory=list)  # whole streams: request to last token
    ttfts: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.outcomes["error"] += 1
        self.errors[what[:120]] += 1


def launch(work: Path, name: str, token: str, *extra: str) -> tuple[Node, int]:
    """A `ringlet node` with its own home under `work`; the node and its control-plane port."""
    api, plane = free_port(), free_port()
    env = {**os.environ, "RINGLET_HOME": str(work / name), "HF_HUB_OFFLINE": "1", CLUSTER_KEY_ENV: token}
    with (work / f"{name}.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ringlet", "node", "--api-port", str(api), "--node-name", name,
                                    "--no-discovery", "--listen", f"tcp/127.0.0.1:{plane}", *extra],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    return Node(name, f"http://127.0.0.1:{api}", process.pid, process), plane


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 900) -> None:
    """Poll `check` every second; a node that does not answer yet (connection refused) is polled again."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def ready_model(node: Node) -> str | None:
    instances = httpx.get(node.url + "/state", timeout=5).json()["instances"].values()
    return next((r["instance"]["model"] for r in instances if r["status"] == "ready"), None)


def node_on_port(url: str) -> int:
    port = urlparse(url).port
    for connection in psutil.net_connections(kind="tcp"):
        if (connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port
                and connection.pid):
            return connection.pid
    raise SystemExit(f"no process on this machine listens on port {port}; --url takes a local node")


def memory_mb(pid: int) -> float:
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a runner that ended since the listing holds nothing
            total += child.memory_info().rss
    return total / 2**20


async def one_request(client: httpx.AsyncClient, url: str, model: str, args: argparse.Namespace,
                      tally: Tally) -> None:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.7,
            "messages": [{"role": "user", "content": f"{secrets.token_hex(3)} {QUESTION}"}]}
    roll = random.random()
    began = time.monotonic()
    try:
        if roll < args.cancel_share:  # a client that gives up before the answer
            try:
                await client.post(url + "/v1/chat/completions", json=body, timeout=random.uniform(0.1, 1.0))
                tally.outcomes["completed before the cancel"] += 1
            except httpx.TimeoutException:
                tally.outcomes["cancelled"] += 1
            return
        drop_after = random.randint(1, 5) if roll < args.cancel_share + args.disconnect_share else None
        async with client.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}) as reply:
            if reply.status_code != 200:
                tally.error(f"HTTP {reply.status_code}: {(await reply.aread()).decode(errors='replace')}")
                return
            chunks = 0
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    tally.error(f"error event: {event['error'].get('message', event['error'])}")
                    return
                chunks += 1
                if chunks == 1:
                    tally.ttfts.append(time.monotonic() - began)
                if drop_after is not None and chunks >= drop_after:
                    tally.outcomes["disconnected"] += 1
                    return
        tally.latencies.append(time.monotonic() - began)
        tally.outcomes["completed"] += 1
    except httpx.HTTPError as error:
        tally.error(f"{type(error).__name__}: {error}")


async def soak(nodes: list[Node], model: str, args: argparse.Namespace) -> Tally:
    tally = Tally()
    began = time.monotonic()
    deadline = began + args.duration

    async def client_loop(index: int) -> None:
        url = nodes[index % len(nodes)].url
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < deadline:
                await one_request(client, url, model, args, tally)

    async def sample_memory() -> None:
        while time.monotonic() < deadline:
            for node in nodes:
                node.memory.append((time.monotonic() - began, memory_mb(node.pid)))
            await asyncio.sleep(SAMPLE_EVERY_S)

    await asyncio.gather(sample_memory(), *(client_loop(i) for i in range(args.clients)))
    for node in nodes:
        node.memory.append((time.monotonic() - began, memory_mb(node.pid)))
    return tally


def percentile(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f} ms"


def report(nodes: list[Node], tally: Tally, args: argparse.Namespace) -> None:
    print(machine())
    print(f"{len(nodes)} node(s), {args.clients} clients, {args.duration:.0f} s, max_tokens {args.max_tokens}, "
          f"disconnects {args.disconnect_share:.0%}, cancels {args.cancel_share:.0%} of requests\n")
    print(f"requests {sum(tally.outcomes.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items())))
    for message, count in tally.errors.most_common(5):
        print(f"  {count} x {message}")
    print(f"whole streams: latency p50 {percentile(tally.latencies, 0.5)}, p95 {percentile(tally.latencies, 0.95)}; "
          f"time to first token p50 {percentile(tally.ttfts, 0.5)}, p95 {percentile(tally.ttfts, 0.95)}")
    print("\nmemory of each node and its runners (MB)")
    print(f"{'s':>6}" + "".join(f"{n.name:>12}" for n in nodes))
    for row in zip(*(n.memory for n in nodes), strict=False):
        print(f"{row[0][0]:>6.0f}" + "".join(f"{mb:>12.0f}" for _, mb in row))
    for node in nodes:
        after_a_minute = next((mb for t, mb in node.memory if t >= 60), None)
        if after_a_minute:
            drift = (node.memory[-1][1] - after_a_minute) / after_a_minute
            print(f"{node.name}: {drift:+.1%} from the first minute's end to the last sample")
    for node in nodes:
        state = httpx.get(node.url + "/state", timeout=10).json()
        print(f"{node.name} afterwards: {len(state['tasks'])} task(s) in flight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running node on this machine (default: start one, or two with --cluster)")
    parser.add_argument("--cluster", action="store_true", help="start two nodes; clients go to both")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--disconnect-share", type=float, default=0.1, help="requests dropped mid-stream")
    parser.add_argument("--cancel-share", type=float, default=0.05, help="non-streaming requests given up on")
    args = parser.parse_args()
    started: list[Node] = []
    with tempfile.TemporaryDirectory(prefix="ringlet-soak-") as tmp:
        try:
            if args.url:
                url = args.url.rstrip("/")
                wait_for(f"{url} answering", lambda: httpx.get(url + "/health", timeout=5).status_code == 200)
                nodes = [Node("node", url, node_on_port(url))]
            else:
                token = token_of(secrets.token_bytes(32))
                first, plane = launch(Path(tmp), "node-a", token)
                started.append(first)
                if args.cluster:
                    second, _ = launch(Path(tmp), "node-b", token, "--no-default-instance",
                                       "--connect", f"tcp/127.0.0.1:{plane}")
                    started.append(second)
                nodes = list(started)
            wait_for("the instance ready", lambda: all(ready_model(n) for n in nodes))
            model = ready_model(nodes[0])
            assert model is not None
            tally = asyncio.run(soak(nodes, model, args))
            time.sleep(5)  # cancels reach the runners
            report(nodes, tally, args)
        finally:
            for node in started:
                assert node.process is not None
                node.process.terminate()
                node.process.wait(60)


if __name__ == "__main__":
    main()
