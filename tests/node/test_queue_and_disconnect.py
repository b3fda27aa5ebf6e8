"""A client that disconnects mid-stream frees its place at once; requests run together in the instance's batch, and
beyond the batch and its queue a request is refused with 429."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import LOAD_TIMEOUT_S, LiveNode, start_node, stop_node, wait_until
from tests.support.streams import LONG, chat_body, join_a_running_stream


def generations(live_node: LiveNode, outcome: str) -> float:
    for line in live_node.get("/metrics").text.splitlines():
        if line.startswith("ringlet_generations_total{") and f'outcome="{outcome}"' in line and "openai" in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_disconnect_mid_stream_frees_the_instance(live_node: LiveNode, model_id: str) -> None:
    cancelled_before = generations(live_node, "cancelled")
    with httpx.Client(timeout=120) as client, \
            client.stream("POST", live_node.url + "/v1/chat/completions", json=chat_body(model_id, LONG, True)) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    # leaving the block closed the connection mid-stream
    freed_after = wait_until(lambda: not live_node.state()["tasks"], 5, "the task leaving the state")
    assert freed_after < 5
    began = time.monotonic()
    reply = live_node.post("/v1/chat/completions", json=chat_body(model_id, 3, False))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - began < 30, "the next request waited for the abandoned generation"
    assert generations(live_node, "cancelled") == cancelled_before + 1


@pytest.mark.slow
def test_disconnect_of_a_non_streaming_request_cancels_it(live_node: LiveNode, model_id: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_node.url + "/v1/chat/completions", json=chat_body(model_id, LONG, False), timeout=2)
    wait_until(lambda: not live_node.state()["tasks"], 5, "the abandoned task leaving the state")


@pytest.mark.slow
def test_requests_run_together_and_a_short_one_ends_while_a_long_one_streams(live_node: LiveNode,
                                                                              model_id: str) -> None:
    """A long stream does not hold the instance: B and C join its batch and finish while it goes on."""
    assert sorted(asyncio.run(join_a_running_stream(live_node.url, model_id))) == ["B", "C", "hog still streaming"]
    wait_until(lambda: not live_node.state()["tasks"], 5, "no task left behind")


@pytest.mark.slow
def test_requests_beyond_the_batch_and_the_queue_get_429(tmp_path: Path) -> None:
    """With a batch of one and no room to wait, a second request while one runs is refused at once with 429."""
    node = start_node(tmp_path, "busy-node", env={"RINGLET_MAX_BATCH": "1", "RINGLET_MAX_QUEUED": "0"})
    try:
        wait_until(lambda: node.ready_instances() or not node.alive(), LOAD_TIMEOUT_S, "the default instance ready",
                   node.log)
        model = node.ready_instances()[0]["instance"]["model"]
        with httpx.Client(timeout=120) as client, \
                client.stream("POST", node.url + "/v1/chat/completions", json=chat_body(model, LONG, True)) as hog:
            lines = hog.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the hog is generating
            refused = client.post(node.url + "/v1/chat/completions", json=chat_body(model, 2, False))
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full" and "retry" in refused.json()["error"]["message"]
        # the hog's stream closed: the instance takes requests again
        assert wait_until(lambda: not node.state()["tasks"], 10, "the hog leaving") < 10
        assert node.post("/v1/chat/completions", json=chat_body(model, 2, False)).status_code == 200
    finally:
        assert stop_node(node) == 0, node.log()
