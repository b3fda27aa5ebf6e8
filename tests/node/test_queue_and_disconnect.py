"""A client that disconnects mid-stream frees the instance at once; concurrent requests are served in order."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.processes import LiveNode

LONG = 4000  # far more tokens than any test waits for: only a cancel ends such a generation early


def chat_body(model: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {"model": model, "max_tokens": max_tokens, "stream": stream, "temperature": 0.8, "seed": 1,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}


def wait_until(condition, timeout_s: float, what: str) -> float:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - began


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
    freed_after = wait_until(lambda: not live_node.get("/state").json()["tasks"], 5, "the task leaving the state")
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
    wait_until(lambda: not live_node.get("/state").json()["tasks"], 5, "the abandoned task leaving the state")


@pytest.mark.slow
def test_concurrent_requests_are_served_first_come_first_served(live_node: LiveNode, model_id: str) -> None:
    """A long stream holds the instance; B then C queue behind it; cancelling the stream serves B, then C."""

    async def scenario() -> list[str]:
        finished: list[str] = []
        async with httpx.AsyncClient(base_url=live_node.url, timeout=120) as client:

            async def short(name: str) -> None:
                reply = await client.post("/v1/chat/completions", json=chat_body(model_id, 2, False))
                assert reply.status_code == 200, reply.text
                finished.append(name)

            async def queued(count: int) -> None:
                while True:
                    tasks = (await client.get("/state")).json()["tasks"].values()
                    if sum(t["status"] == "queued" for t in tasks) >= count:
                        return
                    await asyncio.sleep(0.02)

            async with client.stream("POST", "/v1/chat/completions", json=chat_body(model_id, LONG, True)) as hog:
                lines = hog.aiter_lines()
                await anext(lines)  # the hog is generating
                b = asyncio.create_task(short("B"))
                await asyncio.wait_for(queued(1), 10)
                c = asyncio.create_task(short("C"))
                await asyncio.wait_for(queued(2), 10)
            await asyncio.wait_for(asyncio.gather(b, c), 60)
        return finished

    assert asyncio.run(scenario()) == ["B", "C"]
    assert not live_node.get("/state").json()["tasks"], "no task is left behind"
