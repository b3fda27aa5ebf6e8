"""Instances a user created come back when their node restarts, with their context window (and a deleted one does
not); the node's own default instance is made anew from its options, not saved."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.processes import LOAD_TIMEOUT_S, LiveNode, start_node, stop_node, wait_until

ENV = {"RINGLET_CPU_COMPILE": "0"}


def instances_when_ready(node: LiveNode, count: int) -> list[dict]:
    """The node's instances once there are `count`, all ready."""
    def settled() -> bool:
        records = node.state()["instances"].values()
        return len(records) == count and all(r["status"] == "ready" for r in records)

    wait_until(settled, LOAD_TIMEOUT_S, f"{count} instance(s) ready", node.log)
    return list(node.state()["instances"].values())


@pytest.mark.slow
def test_a_created_instance_comes_back_after_a_restart_and_a_deleted_one_does_not(tmp_path: Path) -> None:
    node = start_node(tmp_path, "keeper", env=ENV)
    try:
        [default] = instances_when_ready(node, 1)
        model = default["instance"]["model"]
        created = node.post("/instance", json={"model": model, "instance_type": "CpuRing", "max_context": 1024})
        assert created.status_code == 201, created.text
        mine = created.json()["instance"]["instance_id"]
        instances_when_ready(node, 2)
    finally:
        assert stop_node(node) == 0, node.log()

    node = start_node(tmp_path, "keeper", env=ENV)
    saved_file = tmp_path / "home" / "instances.json"
    try:
        records = instances_when_ready(node, 2)
        assert [r["instance"]["model"] for r in records] == [model, model]
        [saved] = json.loads(saved_file.read_text())
        restored = saved["instance_id"]
        assert restored != mine and restored in node.state()["instances"] and "created again" in node.log()
        again = node.state()["instances"][restored]
        assert again["instance"]["max_context"] == 1024 and saved["max_context"] == 1024
        assert [r["context_length"] for r in again["runners"].values()] == [1024], "its engine holds 1024 positions"
        assert httpx.delete(f"{node.url}/instance/{restored}").status_code == 200
        # a deleted instance is not created again
        wait_until(lambda: json.loads(saved_file.read_text()) == [], 10, "the deleted instance leaving the file")
    finally:
        assert stop_node(node) == 0, node.log()
