"""Nodes in two network namespaces, joined only by a veth pair, find each other by zenoh multicast scouting with no
--connect when they share the cluster's key, and a node with another key, found the same way, is refused. The
namespaces, the link and the 10.231.7.0/24 addresses exist only inside the test: no traffic leaves them (each
node's API listens on the loopback of its own namespace)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ringlet.net.trust import token_of
from tests.support.netns import start_node, state_of, stop, two_namespaces

pytestmark = pytest.mark.slow
__all__ = ["two_namespaces"]  # the fixture


def node_names_seen_from(ns: str) -> set[str]:
    return {n["name"] for n in state_of(ns).get("nodes", {}).values()}


def test_nodes_in_separate_namespaces_find_each_other_by_scouting(two_namespaces: tuple[str, str],
                                                                  tmp_path: Path) -> None:
    a, b = two_namespaces
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    nodes = [start_node(a, 1, tmp_path / "home", logs[0], "--no-default-instance"),
             start_node(b, 2, tmp_path / "home", logs[1], "--no-default-instance")]
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
    nodes = [start_node(a, 1, tmp_path / "home-a", logs[0], "--no-default-instance"),
             start_node(b, 2, tmp_path / "home-b", logs[1], "--no-default-instance", token=stranger)]
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
