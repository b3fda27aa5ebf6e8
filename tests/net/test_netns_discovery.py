"""Nodes in two network namespaces, joined only by a veth pair, find each other by zenoh multicast scouting with no
--connect when they share the cluster's key, and a node with another key, found the same way, is refused. The
namespaces, the link and the 10.231.7.0/24 addresses exist only inside the test: no traffic leaves them (each
node's API listens on the loopback of its own namespace)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringlet.net.trust import CLUSTER_KEY_ENV, token_of
from tests.support.processes import TEST_CLUSTER_TOKEN

pytestmark = pytest.mark.slow
SUBNET = "10.231.7"
API_PORT = 52415


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


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"cannot test LAN discovery in network namespaces: {reason}")
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
            ip("-n", ns, "link", "set", "veth0", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "veth0")  # zenoh's scouting group
        yield a, b
    finally:
        ip("netns", "del", a)
        ip("netns", "del", b)


def start_node(ns: str, host: int, home: Path, log: Path, token: str = TEST_CLUSTER_TOKEN) -> subprocess.Popen[bytes]:
    args = ["ip", "netns", "exec", ns, sys.executable, "-m", "ringlet", "node", "--node-name", f"{ns}-node",
            "--no-default-instance", "--api-port", str(API_PORT), "--listen", f"tcp/{SUBNET}.{host}:52414"]
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "RINGLET_HOME": str(home), CLUSTER_KEY_ENV: token})


def stop(nodes: list[subprocess.Popen[bytes]]) -> None:
    for p in nodes:
        p.terminate()
    for p in nodes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def node_names_seen_from(ns: str) -> set[str]:
    code = (f"import httpx,json;print(json.dumps([n['name'] for n in "
            f"httpx.get('http://127.0.0.1:{API_PORT}/state',timeout=5).json()['nodes'].values()]))")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=False, capture_output=True,
                          text=True)
    return set(json.loads(done.stdout)) if done.returncode == 0 else set()


def test_nodes_in_separate_namespaces_find_each_other_by_scouting(two_namespaces: tuple[str, str],
                                                                  tmp_path: Path) -> None:
    a, b = two_namespaces
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    nodes = [start_node(a, 1, tmp_path / "home", logs[0]), start_node(b, 2, tmp_path / "home", logs[1])]
    try:
        deadline = time.monotonic() + 60
        wanted = {f"{a}-node", f"{b}-node"}
        while not (node_names_seen_from(a) == wanted and node_names_seen_from(b) == wanted):
            assert all(p.poll() is None for p in nodes), "a node exited:\n" + "\n".join(p.read_text() for p in logs)
            if time.monotonic() > deadline:
                raise AssertionError("the nodes did not find each other in 60 s:\n"
                                     + "\n".join(p.read_text() for p in logs))
            time.sleep(0.5)
    finally:
        stop(nodes)


def test_a_node_without_the_clusters_key_is_refused_though_scouting_finds_it(two_namespaces: tuple[str, str],
                                                                            tmp_path: Path) -> None:
    a, b = two_namespaces
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    stranger = token_of(bytes(32))
    nodes = [start_node(a, 1, tmp_path / "home-a", logs[0]), start_node(b, 2, tmp_path / "home-b", logs[1], stranger)]
    try:
        deadline = time.monotonic() + 60
        while not (node_names_seen_from(a) and node_names_seen_from(b)):  # both serving
            assert all(p.poll() is None for p in nodes), "a node exited:\n" + "\n".join(p.read_text() for p in logs)
            assert time.monotonic() < deadline, "the nodes did not start in 60 s"
            time.sleep(0.5)
        time.sleep(8)  # scouting finds a peer within a second or two; a handshake that succeeded would show here
        assert node_names_seen_from(a) == {f"{a}-node"} and node_names_seen_from(b) == {f"{b}-node"}
        for log in logs:  # each says once that it refused the other
            refusals = [line for line in log.read_text().splitlines() if "refused zenoh peer" in line]
            assert len(refusals) == 1 and "cluster key" in refusals[0], log.read_text()[-3000:]
    finally:
        stop(nodes)
