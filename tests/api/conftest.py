"""A live node for the API tests: `ringlet node` in a subprocess serving the embedded model on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

STARTUP_TIMEOUT_S = 120
LOAD_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveNode:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_instances(self) -> list[dict[str, Any]]:
        state = self.get("/state").json()
        return [r for r in state["instances"].values() if r["status"] == "ready"]

    def runner_pids(self) -> list[int]:
        state = self.get("/state").json()
        return [r["pid"] for rec in state["instances"].values() for r in rec["runners"].values() if r["pid"]]

    def wait_for_instance(self, instance_id: str, timeout_s: float = LOAD_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.get(f"/instance/{instance_id}").json()
            if record["status"] != "loading":
                return record
            time.sleep(0.25)
        raise TimeoutError(f"instance {instance_id} still loading after {timeout_s} s; node log:\n{self.log()}")


def start_node(log_dir: Path, *extra: str) -> LiveNode:
    port = free_port()
    log_path = log_dir / f"node-{port}.log"
    env = {**os.environ, "RINGLET_HOME": str(log_dir / "home"),
           # an empty model store, not the user's; no test may reach a real hub (the fuzzer starts downloads)
           "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    # no LAN discovery and a loopback control plane: test traffic never leaves this machine
    cluster = ["--no-discovery", "--listen", f"tcp/127.0.0.1:{free_port()}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ringlet", "node", "--api-port", str(port), "--node-name", f"test-{port}",
             *cluster, *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    node = LiveNode(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ringlet node exited with {process.returncode}:\n{node.log()}")
        try:
            if node.get("/health").status_code == 200:
                return node
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.25)
    stop_node(node)
    raise TimeoutError(f"ringlet node did not answer /health within {STARTUP_TIMEOUT_S} s:\n{node.log()}")


def stop_node(node: LiveNode) -> int:
    """SIGTERM, as a service manager would; returns the exit code. The runners must go with the node."""
    runners = node.runner_pids() if node.process.poll() is None else []
    node.process.send_signal(signal.SIGTERM)
    try:
        code = node.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait()
        raise
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in runners):
        if time.monotonic() > deadline:
            raise AssertionError(f"runner processes {runners} outlived their node")
        time.sleep(0.1)
    return code


@pytest.fixture(scope="session")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    """One node for the whole API suite, with the default instance (the embedded model) ready."""
    node = start_node(tmp_path_factory.mktemp("live-node"))
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not node.ready_instances():
            if time.monotonic() > deadline or node.process.poll() is not None:
                raise TimeoutError(f"the default instance did not become ready:\n{node.log()}")
            time.sleep(0.25)
        yield node
    finally:
        code = stop_node(node)
    assert code == 0, f"the node exited with {code} on SIGTERM:\n{node.log()}"


@pytest.fixture(scope="session")
def model_id(live_node: LiveNode) -> str:
    return live_node.ready_instances()[0]["instance"]["model"]
