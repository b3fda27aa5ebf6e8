"""Two nodes on separate network hosts (namespaces joined by a veth pair) are cut apart for longer than the lease
and the grace: each side goes on alone, the side without the instance places it again, and when the link comes
back the two sides agree on one state (the master of the higher term's), the other side's runners stopped: one
runner process for each stage of each instance, and a request through either node is served."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.netns import api, ip, link_up, start_node, state_of, stop, two_namespaces

pytestmark = pytest.mark.slow
__all__ = ["two_namespaces"]  # the fixture

GRACE_S = 2  # RINGLET_REPLACE_GRACE_S of both nodes
ENV = {"RINGLET_REPLACE_GRACE_S": str(GRACE_S), "RINGLET_CPU_COMPILE": "0"}


def runner_pids(node: psutil.Process) -> set[int]:
    """The node's runner processes."""
    return {c.pid for c in node.children() if "ringlet.worker.runner" in c.cmdline()}


def ready_instances(state: dict[str, Any]) -> set[str]:
    return {i for i, r in state.get("instances", {}).items() if r["status"] == "ready"}


def test_a_partition_heals_into_one_state_with_one_runner_for_each_stage(two_namespaces: tuple[str, str],
                                                                       tmp_path: Path) -> None:
    a, b = two_namespaces
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    nodes = [start_node(a, 1, tmp_path / "home-a", logs[0], env=ENV),  # with the default instance
             start_node(b, 2, tmp_path / "home-b", logs[1], "--no-default-instance", "--connect",
                        "tcp/10.231.7.1:52414", env=ENV)]

    def wait(condition: Callable[[], object], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert all(p.poll() is None for p in nodes), "a node exited:\n" + "\n".join(p.read_text() for p in logs)
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s} s\n"
                                     + "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in logs))
            time.sleep(0.5)

    try:
        wait(lambda: len(state_of(a).get("nodes", {})) == len(state_of(b).get("nodes", {})) == 2, 90,
             "both nodes in one cluster")
        wait(lambda: ready_instances(state_of(a)), 240, "the default instance ready")
        before = state_of(a)
        (instance_id,) = before["instances"]
        node_a = next(i for i, n in before["nodes"].items() if n["name"] == f"{a}-node")
        assert set(before["instances"][instance_id]["runners"]) == {node_a}

        ip("-n", b, "link", "set", "veth0", "down")  # a's sends vanish silently; b's fail at once
        wait(lambda: len(state_of(a).get("nodes", {})) == 1 and len(state_of(b).get("nodes", {})) == 1, 60,
             "each side alone, the other departed after the lease and the grace")
        wait(lambda: ready_instances(state_of(b)), 240, "b placing a's instance again on itself")
        assert ready_instances(state_of(a)) == {instance_id}, "a's side keeps its instance"

        link_up(b)
        ip("-n", a, "route", "replace", "224.0.0.0/4", "dev", "veth0")

        def agreed() -> bool:
            states = [state_of(a), state_of(b)]
            views = {(tuple(sorted(s.get("nodes", {}))), tuple(sorted(s.get("instances", {}))), s.get("master"),
                      s.get("term")) for s in states}
            return len(views) == 1 and len(states[0]["nodes"]) == 2

        wait(agreed, 90, "the two sides agreeing on one state")
        state = state_of(a)
        assert ready_instances(state) == set(state["instances"]), state["instances"]
        stages = {r["pid"] for rec in state["instances"].values() for r in rec["runners"].values()}
        processes = [psutil.Process(p.pid) for p in nodes]
        wait(lambda: set().union(*(runner_pids(p) for p in processes)) == stages, 60,
             "one runner process for each stage of each instance, the others stopped")

        for ns in (a, b):
            status, reply = api(ns, "/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": "Hello",
                                                        "max_tokens": 4, "temperature": 0})
            assert status == 200 and reply["usage"]["completion_tokens"] >= 1, (ns, status, reply)
    finally:
        stop(nodes)
