"""Network namespaces joined by a veth pair, for nodes that must be on separate network hosts: each namespace has
its own loopback and one address in 10.231.7.0/24, and nothing else; no traffic leaves them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringlet.net.trust import CLUSTER_KEY_ENV
from tests.support.processes import TEST_CLUSTER_TOKEN

SUBNET = "10.231.7"
API_PORT = 52415
ZENOH_PORT = 52414


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"rlprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    ip("netns", "del", probe)
    return None


def link_up(ns: str) -> None:
    """Bring the namespace's end of the pair up, with the route of zenoh's scouting group through it."""
    ip("-n", ns, "link", "set", "veth0", "up")
    ip("-n", ns, "route", "replace", "224.0.0.0/4", "dev", "veth0")


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"cannot put nodes on separate network hosts: {reason}")
    tag = uuid.uuid4().hex[:5]
    a, b = f"rl{tag}a", f"rl{tag}b"
    ip("netns", "add", a)
    ip("netns", "add", b)
    try:
        # the veth pair is born inside namespace a, its peer end moved straight into b
        ip("-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", b)
        for ns, host in ((a, 1), (b, 2)):
            ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", "veth0")
            ip("-n", ns, "link", "set", "lo", "up")
            link_up(ns)
        yield a, b
    finally:
        ip("netns", "del", a)
        ip("netns", "del", b)


def start_node(ns: str, host: int, home: Path, log: Path, *extra: str, token: str = TEST_CLUSTER_TOKEN,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`ringlet node` in namespace `ns` (as its `host` address), its API on that namespace's loopback."""
    args = ["ip", "netns", "exec", ns, sys.executable, "-m", "ringlet", "node", "--node-name", f"{ns}-node",
            "--api-port", str(API_PORT), "--listen", f"tcp/{SUBNET}.{host}:{ZENOH_PORT}", *extra]
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "RINGLET_HOME": str(home), CLUSTER_KEY_ENV: token,
                                     "HF_HUB_OFFLINE": "1", **(env or {})})


def stop(nodes: list[subprocess.Popen[bytes]]) -> None:
    for p in nodes:
        p.terminate()
    for p in nodes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def api(ns: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 60) -> tuple[int, Any]:
    """A request to the API of the node in `ns` (GET, or POST with `body`): its status and JSON, (0, None) when
    the node does not answer."""
    call = (f"httpx.post(u, json=json.loads(sys.argv[1]), timeout={timeout_s})" if body is not None
            else f"httpx.get(u, timeout={timeout_s})")
    code = (f"import httpx, json, sys\nu = 'http://127.0.0.1:{API_PORT}{path}'\nr = {call}\n"
            "print(json.dumps([r.status_code, r.json()]))")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, json.dumps(body)], check=False,
                          capture_output=True, text=True, timeout=timeout_s + 30)
    if done.returncode != 0:
        return 0, None
    status, payload = json.loads(done.stdout)
    return int(status), payload


def state_of(ns: str) -> dict[str, Any]:
    status, payload = api(ns, "/state", timeout_s=5)
    return payload if status == 200 else {}
