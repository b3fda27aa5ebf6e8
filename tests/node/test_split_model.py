"""The embedded model (30 layers) split over 2 and 3 node processes gives exactly the single-node greedy tokens;
a request sent to a node that holds no first stage streams from the node that does; kill -9 of a stage's node
ends a streamed request with an error within 5 s, and the instance is placed again on the survivors; so does
kill -9 of the node a request was forwarded to."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.support.instances import MODEL, complete, create, delete, stream
from tests.support.processes import Cluster, LiveNode, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes(shared_cluster: Cluster) -> list[LiveNode]:
    nodes = shared_cluster.start("s1", "s2", "s3")
    shared_cluster.wait_agreed(3)
    return nodes


def test_split_over_two_and_three_nodes_matches_single_node(shared_cluster: Cluster,
                                                            three_nodes: list[LiveNode]) -> None:
    cluster, nodes = shared_cluster, three_nodes
    ids = [n.node_id for n in nodes]

    single = create(nodes[0], cluster, ids[:1])
    expected = complete(nodes[0])["choices"][0]["text"]
    assert expected.strip()
    delete(nodes[0], single)

    two = create(nodes[0], cluster, ids[:2])
    assert complete(nodes[0])["choices"][0]["text"] == expected
    delete(nodes[0], two)

    three = create(nodes[0], cluster, ids)
    assert complete(nodes[0])["choices"][0]["text"] == expected
    # the API of s2 has no first stage: it forwards to s1 and streams what s1 streams
    text, events = stream(nodes[1])
    assert text == expected
    assert len(events) >= 3
    assert nodes[0].state()["instances"][three]["status"] == "ready"  # the next test kills its middle stage


def stream_then_kill(cluster: Cluster, via: LiveNode, victim: LiveNode) -> tuple[list[dict[str, Any]], float]:
    """Stream a long completion through `via`, kill -9 `victim` once it streams: the events, and how long after the
    kill the stream ended."""
    events: list[dict[str, Any]] = []
    ended: dict[str, float] = {}

    def consume() -> None:
        # counting goes on for hundreds of tokens: the stream is still running when the node dies
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9,", "max_tokens": 1500, "temperature": 0,
                "stream": True}
        try:
            with httpx.stream("POST", via.url + "/v1/completions", json=body, timeout=60) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
        finally:
            ended["at"] = time.monotonic()

    reader = threading.Thread(target=consume)
    reader.start()
    wait_until(lambda: len(events) >= 3, 30, "the stream started", cluster.logs)
    killed_at = time.monotonic()
    cluster.stop(victim, kill=True)
    reader.join(timeout=10)
    assert "at" in ended, "the request did not end within 10 s of the kill"
    return events, ended["at"] - killed_at


def test_kill_stage_node_mid_stream_errors_fast_then_replaced(shared_cluster: Cluster,
                                                             three_nodes: list[LiveNode]) -> None:
    cluster, nodes = shared_cluster, three_nodes
    ids = [n.node_id for n in nodes]
    (instance_id,) = [i for i, r in nodes[0].state()["instances"].items() if len(r["instance"]["shards"]) == 3]
    events, seconds = stream_then_kill(cluster, nodes[0], nodes[1])
    assert seconds < 5.0
    assert "error" in events[-1], events[-1]

    def replaced() -> bool:
        instances = nodes[0].state()["instances"]
        return instance_id not in instances and any(r["status"] == "ready" for r in instances.values())

    wait_until(replaced, 120, "the instance placed again on the survivors", cluster.logs)
    for record in nodes[0].state()["instances"].values():
        assert ids[1] not in record["runners"]
    assert complete(nodes[2])["usage"]["completion_tokens"] >= 1


def test_a_stream_forwarded_to_a_node_that_dies_ends_with_an_error_within_5_s(shared_cluster: Cluster,
                                                                           three_nodes: list[LiveNode]) -> None:
    cluster, (first, _, third) = shared_cluster, three_nodes
    for instance_id in list(first.state()["instances"]):
        delete(first, instance_id)
    create(first, cluster, [third.node_id])  # wholly on the third node: the first forwards to it
    events, seconds = stream_then_kill(cluster, first, third)
    assert seconds < 5.0
    assert "error" in events[-1], events[-1]
    assert first.get("/health").status_code == 200
