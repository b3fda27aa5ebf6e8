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

# each asks for the same context window (given none, the last to fit would hold a shorter one)
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
    needs = create_many(node, 1)[0].json()["memory_bytes"][node.info.node_id]
    # a node whose free memory holds about two such instances (with placement's margin): each one placed there counts
    # the KV cache its engine will take, a share of the room the ones before it leave, until not one window fits
    small = Node(node_info("b", 2.5 * needs / 2**30 / 0.8), config=EngineConfig(max_instances=100))
    replies = create_many(small, 40)
    codes = [r.status_code for r in replies]
    assert 409 in codes, [r.text for r in replies]
    placed = codes.index(409)
    assert placed >= 2 and codes[placed:] == [409] * (len(codes) - placed)
    assert "still loading instances" in replies[placed].json()["error"]["message"]
    sizes = [r.json()["memory_bytes"][small.info.node_id] for r in replies[:placed]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1], "each a share of a smaller room"
