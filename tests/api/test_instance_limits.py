"""A node takes instances only while it has room: at most RINGLET_MAX_INSTANCES with a stage on it, and memory for
a new one on top of what its instances still loading will take (its reported free memory shows them only once they
are loaded). In process over ASGI: the node is not started, so no runner loads anything."""

from __future__ import annotations

import asyncio

import httpx

from ringlet.api.app import create_app
from ringlet.node import Node
from ringlet.shared.config import EngineConfig
from ringlet.shared.state import NodeJoined
from tests.support.node_infos import node_info

# each asks for the same context window, so each is the same size (given none, the last to fit would hold less)
MODEL = {"model": "SmolLM2-135M-Instruct", "max_context": 8192}


def create_many(node: Node, count: int) -> list[httpx.Response]:
    node.apply_ordered(NodeJoined(node=node.info))
    app = create_app(node)

    async def call() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            return [await client.post("/instance", json=MODEL) for _ in range(count)]

    return asyncio.run(call())


def test_fifty_instance_requests_stop_at_the_nodes_limit_with_a_clear_409() -> None:
    replies = create_many(Node(node_info("a", 64), config=EngineConfig(max_instances=4)), 50)
    assert [r.status_code for r in replies] == [201] * 4 + [409] * 46
    error = replies[-1].json()["error"]
    assert error["code"] == "placement_impossible"
    assert "runs 4 instances already" in error["message"] and "RINGLET_MAX_INSTANCES=4" in error["message"]


def test_instances_still_loading_hold_their_memory() -> None:
    node = Node(node_info("a", 64), config=EngineConfig(max_instances=100))
    first = create_many(node, 1)[0]
    needs = first.json()["memory_bytes"][node.info.node_id]
    # a node whose free memory holds two such instances (with placement's margin), not three
    small = Node(node_info("b", 2.5 * needs / 2**30 / 0.8), config=EngineConfig(max_instances=100))
    replies = create_many(small, 4)
    assert [r.status_code for r in replies[:2]] == [201, 201], [r.text for r in replies]
    assert replies[2].status_code == 409 and "still loading instances" in replies[2].json()["error"]["message"]
