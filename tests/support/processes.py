"""Live `ringlet node` processes for the tests: one node, or a cluster of nodes on loopback joined by explicit
endpoints (no multicast, a loopback control plane: test traffic never leaves this machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from ringlet.net.trust import CLUSTER_KEY_ENV, token_of

STARTUP_TIMEOUT_S = 120
LOAD_TIMEOUT_S = 300


def _ports_outside_ephemeral_range() -> range:
    """Ports the kernel never hands to an outgoing connection: an ephemeral port that is free now (bind to 0) can be
    taken by some node's connection before the node meant to listen on it binds it."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default range
    return range(10000, low) if low - 10000 >= 2000 else range(high + 1, 65536)


_PORTS = _ports_outside_ephemeral_range()
_handed_out: set[int] = set()
_next_port = [_PORTS.start + (os.getpid() * 7919) % len(_PORTS)]


def free_port() -> int:
    """A loopback port nothing listens on, outside the ephemeral range, and never one this process handed out."""
    for _ in range(len(_PORTS)):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < _PORTS.stop else _PORTS.start
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_PORTS}")


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, logs: Callable[[], str] = str,
               poll_s: float = 0.05) -> float:
    """Poll `condition` until it is true; the seconds it took. TimeoutError with `logs()` when it is not."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s} s\n{logs()}")
        time.sleep(poll_s)
    return time.monotonic() - began


@dataclass
class LiveNode:
    name: str
    url: str
    zenoh_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    home: Path  # its RINGLET_HOME: the store is home/models

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kwargs)

    def json(self, path: str) -> Any:
        response = self.get(path)
        response.raise_for_status()
        return response.json()

    def state(self) -> dict[str, Any]:
        return self.json("/state")

    @property
    def node_id(self) -> str:
        return str(self.json("/node_id")["node_id"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready_instances(self) -> list[dict[str, Any]]:
        return [r for r in self.state()["instances"].values() if r["status"] == "ready"]

    def runner_pids(self) -> list[int]:
        return [r["pid"] for rec in self.state()["instances"].values() for r in rec["runners"].values() if r["pid"]]

    def wait_for_instance(self, instance_id: str, timeout_s: float = LOAD_TIMEOUT_S) -> dict[str, Any]:
        """The instance's record once it is no longer loading (ready or failed)."""
        seen: dict[str, Any] = {}

        def settled() -> bool:
            seen.update(self.json(f"/instance/{instance_id}"))
            return seen["status"] != "loading"

        wait_until(settled, timeout_s, f"instance {instance_id} loaded", self.log, poll_s=0.1)
        return seen

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> LiveNode:
        def healthy() -> bool:
            if not self.alive():
                raise RuntimeError(f"node {self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                return self.get("/health").status_code == 200
            except httpx.TransportError:
                return False  # not listening yet

        wait_until(healthy, timeout_s, f"node {self.name} answering /health", self.log, poll_s=0.05)
        return self


TEST_CLUSTER_TOKEN = token_of(bytes(range(32)))


def launch_node(work_dir: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> LiveNode:
    """Start `ringlet node` without waiting for it: its own store under `work_dir`, no hub, a loopback control
    plane. `extra` goes to `ringlet node` (e.g. --no-default-instance, --connect)."""
    api_port, zenoh_port = free_port(), free_port()
    log_path = work_dir / f"{name}.log"
    environment = {**os.environ, "RINGLET_HOME": str(work_dir / "home"),
                   # an empty model store, not the user's; no test may reach a real hub (the fuzzer starts downloads)
                   "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
                   # one cluster: the tests' nodes share its key (a test gives another to make a stranger)
                   CLUSTER_KEY_ENV: TEST_CLUSTER_TOKEN,
                   # fp32: the embedded 4-bit file's greedy answers depend on the int4 kernel's rounding
                   # (tests/worker/engines/test_generate.py says why); the tests ask for Paris
                   "RINGLET_PRECISION": "fp32", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ringlet", "node", "--api-port", str(api_port), "--node-name", name,
             "--no-discovery", "--listen", f"tcp/127.0.0.1:{zenoh_port}", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=environment,
        )
    return LiveNode(name, f"http://127.0.0.1:{api_port}", zenoh_port, process, log_path,
                    Path(environment["RINGLET_HOME"]))


def start_node(work_dir: Path, name: str = "test-node", *extra: str, env: dict[str, str] | None = None) -> LiveNode:
    """A node answering /health (its default instance, unless --no-default-instance, may still be loading)."""
    node = launch_node(work_dir, name, *extra, env=env)
    try:
        return node.wait_healthy()
    except BaseException:
        stop_node(node)
        raise


def stop_node(node: LiveNode, kill: bool = False) -> int:
    """SIGTERM, as a service manager would (or SIGKILL); the exit code. The runners must go with the node."""
    if not node.alive():
        return node.process.returncode
    try:
        runners = node.runner_pids() if not kill else []
    except httpx.HTTPError:
        runners = []
    node.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        code = node.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait()
        raise
    def runners_gone() -> bool:
        return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in runners)

    try:
        wait_until(runners_gone, 10, f"runner processes {runners} ending with their node", poll_s=0.1)
    except TimeoutError:
        raise AssertionError(f"runner processes {runners} outlived their node") from None
    return code


class Cluster:
    """Nodes started in one directory; every node connects to the first live one (gossip does the rest). Nodes run
    in fp32 unless told otherwise, so a split model gives a single node's greedy tokens."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, own_homes: bool = False) -> None:
        """`env`: settings of every node, beside the cluster's own; `own_homes`: each node has its own RINGLET_HOME
        (its own model store) under root/NAME, as on separate machines, rather than one for all."""
        self.root, self.env, self.own_homes = root, env or {}, own_homes
        self.nodes: list[LiveNode] = []

    def launch(self, name: str, *extra: str) -> LiveNode:
        seeds = [n for n in self.nodes if n.alive()][:1]
        connect = [a for n in seeds for a in ("--connect", f"tcp/127.0.0.1:{n.zenoh_port}")]
        # a short grace before a lost node's instances are placed again, so that departures show within seconds
        home = {"RINGLET_HOME": str(self.root / name / "home")} if self.own_homes else {}
        node = launch_node(self.root, name, "--no-default-instance", *connect, *extra,
                           env={"RINGLET_PRECISION": "fp32", "RINGLET_REPLACE_GRACE_S": "2", **home, **self.env})
        self.nodes.append(node)
        return node

    def start(self, *names: str) -> list[LiveNode]:
        """Start nodes side by side (a node takes seconds to import torch and probe its engines)."""
        launched = [self.launch(name) for name in names]
        return [node.wait_healthy() for node in launched]

    def live(self) -> list[LiveNode]:
        return [n for n in self.nodes if n.alive()]

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log()[-6000:]}" for n in self.nodes)

    def wait_agreed(self, count: int, timeout_s: float = 30) -> dict[str, Any]:
        """Wait until every live node reports the same `count` nodes and the same instances; the state then."""
        seen: dict[str, Any] = {}

        def agreed() -> bool:
            states = [n.state() for n in self.live()]
            views = {(tuple(sorted(s["nodes"])), tuple(sorted(s["instances"]))) for s in states}
            seen["state"] = states[0]
            return len(views) == 1 and len(states[0]["nodes"]) == count

        wait_until(agreed, timeout_s, f"{len(self.live())} nodes agreeing on {count} members", self.logs, poll_s=0.1)
        return seen["state"]

    def stop(self, node: LiveNode, kill: bool = False) -> None:
        if not node.alive():
            return
        node.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            node.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()

    def close(self) -> None:
        for node in self.nodes:
            self.stop(node)
