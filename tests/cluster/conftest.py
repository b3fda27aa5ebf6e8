"""Cluster nodes for the tests: `ringlet node` processes on loopback, joined by explicit endpoints (no multicast:
test traffic stays on loopback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import free_port

STARTUP_TIMEOUT_S = 60
LOAD_TIMEOUT_S = 180


@dataclass
class ClusterNode:
    name: str
    url: str
    zenoh_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def state(self) -> dict[str, Any]:
        return self.get("/state").json()

    @property
    def node_id(self) -> str:
        return self.get("/node_id").json()["node_id"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, logs: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s\n{logs()}")
        time.sleep(0.2)


class Cluster:
    """Nodes started in a temporary directory; every node connects to the first one (gossip does the rest)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[ClusterNode] = []

    def launch(self, name: str, *extra: str) -> ClusterNode:
        """Start a node process without waiting for it; it connects to the first node started (zenoh retries
        until that one listens)."""
        api_port, zenoh_port = free_port(), free_port()
        seeds = [n for n in self.nodes if n.alive()][:1]
        args = [sys.executable, "-m", "ringlet", "node", "--api-port", str(api_port), "--node-name", name,
                "--no-default-instance", "--no-discovery", "--listen", f"tcp/127.0.0.1:{zenoh_port}",
                *[a for n in seeds for a in ("--connect", f"tcp/127.0.0.1:{n.zenoh_port}")], *extra]
        log_path = self.root / f"{name}.log"
        env = {**os.environ, "RINGLET_HOME": str(self.root / "home"), "RINGLET_PRECISION": "fp32"}
        with log_path.open("wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        node = ClusterNode(name, f"http://127.0.0.1:{api_port}", zenoh_port, process, log_path)
        self.nodes.append(node)
        return node

    def wait_healthy(self, node: ClusterNode) -> ClusterNode:
        def healthy() -> bool:
            if node.process.poll() is not None:
                raise RuntimeError(f"node {node.name} exited with {node.process.returncode}:\n{node.log()}")
            try:
                return node.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, STARTUP_TIMEOUT_S, f"node {node.name} answering /health", node.log)
        return node

    def start(self, *names: str) -> list[ClusterNode]:
        """Start nodes side by side (a node takes seconds to import torch and probe its engines)."""
        launched = [self.launch(name) for name in names]
        return [self.wait_healthy(node) for node in launched]

    def live(self) -> list[ClusterNode]:
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

        wait_until(agreed, timeout_s, f"{len(self.live())} nodes agreeing on {count} members", self.logs)
        return seen["state"]

    def stop(self, node: ClusterNode, kill: bool = False) -> None:
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for a whole module (starting nodes costs seconds each); its tests run in file order."""
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.close()
