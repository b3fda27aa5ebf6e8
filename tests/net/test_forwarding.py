"""A task forwarded to another node over two control planes on loopback: a long silence on the serving side (the task
waiting in a queue) is bridged by keep-alives, and a serving node that vanishes without a word (its session gone
before the membership notices) ends the stream with an error within the idle time, never silence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from ringlet.net.forwarding import TaskForwarding
from ringlet.net.session import ControlPlane, NetOptions
from ringlet.shared.errors import TaskError
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask
from tests.support.processes import free_port

IDLE_S, KEEPALIVE_S = 1.5, 0.3


def task(task_id: str) -> TextGenerationTask:
    return TextGenerationTask(task_id=task_id, prompt="hi", max_tokens=2, sampling=SamplingParams(temperature=0))


async def slow_then_done(_instance_id: str, task: TextGenerationTask) -> AsyncIterator[GenerationChunk]:
    """A task that waits twice the idle time (in a queue, say) before its answer."""
    await asyncio.sleep(2 * IDLE_S)
    yield GenerationChunk(task_id=task.task_id, text="done", finish_reason="stop", last=True)


async def forever(_instance_id: str, task: TextGenerationTask) -> AsyncIterator[GenerationChunk]:
    yield GenerationChunk(task_id=task.task_id, text="first")
    await asyncio.sleep(3600)
    yield GenerationChunk(task_id=task.task_id, text="never", last=True)


async def pair(run_local) -> tuple[ControlPlane, ControlPlane, TaskForwarding]:  # type: ignore[no-untyped-def]
    """A requesting node's forwarding and a serving node's, linked; the requesting side's plane, the serving side's,
    and the requesting side's forwarding."""
    port = free_port()
    requesting = ControlPlane(NetOptions(listen=[f"tcp/127.0.0.1:{port}"], discovery=False))
    serving = ControlPlane(NetOptions(listen=[], connect=[f"tcp/127.0.0.1:{port}"], discovery=False))
    forwarding = TaskForwarding(requesting, "node-a", run_local, IDLE_S, KEEPALIVE_S)
    TaskForwarding(serving, "node-b", run_local, IDLE_S, KEEPALIVE_S)
    await asyncio.sleep(0.5)  # the subscriptions reach the other side
    return requesting, serving, forwarding


def test_keep_alives_carry_a_stream_through_a_silence_longer_than_the_idle_time() -> None:
    async def run() -> list[str]:
        requesting, serving, forwarding = await pair(slow_then_done)
        try:
            return [chunk.text async for chunk in forwarding.forward("node-b", "inst-1", task("t-slow"))]
        finally:
            serving.close()
            requesting.close()

    assert asyncio.run(run()) == ["done"]


def test_a_serving_node_that_vanishes_ends_the_stream_with_an_error_within_the_idle_time() -> None:
    async def run() -> tuple[list[str], float]:
        requesting, serving, forwarding = await pair(forever)
        texts: list[str] = []
        try:
            with pytest.raises(TaskError) as failure:
                async for chunk in forwarding.forward("node-b", "inst-1", task("t-gone")):
                    texts.append(chunk.text)
                    serving.close()  # gone without a word: no chunk, no keep-alive, no failure message
                    closed = time.monotonic()
            assert failure.value.kind == "runner_failed" and "node-b sent nothing" in str(failure.value)
            return texts, time.monotonic() - closed
        finally:
            requesting.close()

    texts, after_s = asyncio.run(run())
    assert texts == ["first"]
    assert IDLE_S - 0.1 < after_s < IDLE_S + 2
