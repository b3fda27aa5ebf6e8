"""A runner that stops answering (SIGSTOP) or dies (SIGKILL) mid-stream: the stream ends with an error event, the
runner is started again, and a request that was waiting in the queue is answered by the new runner; a death past
the restarts allowed fails the instance, with the reason in its state."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import LOAD_TIMEOUT_S, LiveNode, start_node, stop_node, wait_until
from tests.support.streams import LONG, chat_body

STALL_S = 5


def stream_until_it_ends(node: LiveNode, model: str, runner_pid: int, sig: signal.Signals,
                         replies: list[httpx.Response]) -> tuple[dict, float, threading.Thread]:
    """Stream a long answer; after its first chunk send a short request (with a batch of one it waits in the queue
    behind the stream), then `sig` to the runner. The error event that ended the stream, how long after the signal
    it came, and the thread of the queued request (its reply lands in `replies`)."""
    with httpx.Client(timeout=120) as client, \
            client.stream("POST", node.url + "/v1/chat/completions", json=chat_body(model, LONG, True)) as reply:
        assert reply.status_code == 200
        lines = (line for line in reply.iter_lines() if line.startswith("data: "))
        next(lines)
        queued = threading.Thread(target=lambda: replies.append(httpx.post(
            node.url + "/v1/chat/completions", json=chat_body(model, 3, False), timeout=LOAD_TIMEOUT_S)))
        queued.start()
        wait_until(lambda: len(node.state()["tasks"]) == 2, 10, "the short request queued")
        os.kill(runner_pid, sig)
        signalled = time.monotonic()
        for line in lines:
            event = json.loads(line.removeprefix("data: ")) if line != "data: [DONE]" else {}
            if "error" in event:
                return event["error"], time.monotonic() - signalled, queued
        raise AssertionError("the stream ended without an error event")


@pytest.mark.slow
def test_a_stopped_then_a_killed_runner_ends_its_stream_and_serves_the_queue_after_a_restart(tmp_path: Path) -> None:
    node = start_node(tmp_path, "watchdog-node", env={"RINGLET_RUNNER_STALL_S": str(STALL_S), "RINGLET_MAX_BATCH": "1",
                                                      "RINGLET_RUNNER_RESTARTS": "2", "RINGLET_CPU_COMPILE": "0",
                                                      "RINGLET_MAX_STEP_TOKENS": "2048"})
    try:
        wait_until(lambda: node.ready_instances() or not node.alive(), LOAD_TIMEOUT_S, "the default instance ready",
                   node.log)
        model = node.ready_instances()[0]["instance"]["model"]
        # idle longer than the stall time, then a prompt of about 750 tokens filled in one step (well within the
        # stall time, even on a loaded machine; the watchdog looks every second): a runner is silent by right while it
        # has nothing to do, so its silence counts from its first request
        [idle] = node.runner_pids()
        time.sleep(STALL_S + 1)
        long_prompt = chat_body(model, 2, False) | {"messages": [{"role": "user", "content": "tell me more " * 250}]}
        answered = node.post("/v1/chat/completions", json=long_prompt)
        assert answered.status_code == 200, answered.text
        assert node.runner_pids() == [idle] and "sent nothing" not in node.log()
        # stopped: the watchdog kills it after STALL_S of silence; killed: its reader sees it die at once
        for sig, within_s in ((signal.SIGSTOP, STALL_S + 5), (signal.SIGKILL, 5)):
            [runner] = node.runner_pids()
            replies: list[httpx.Response] = []
            error, after_s, queued = stream_until_it_ends(node, model, runner, sig, replies)
            assert error["code"] == "runner_failed", error
            assert "starting again" in error["message"], error
            assert after_s < within_s, f"{sig.name}: the stream ended {after_s:.1f} s after the signal"
            queued.join(LOAD_TIMEOUT_S)
            [reply] = replies
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 3, "the queued request was answered by the new runner"
            [restarted] = node.runner_pids()
            assert restarted != runner
            assert node.ready_instances(), "the instance is ready again"
        assert "the runner sent nothing for" in node.log() and "killed by SIGKILL" in node.log()
        # a third death within the window: the instance fails, and says why
        [runner] = node.runner_pids()
        replies = []
        error, _, queued = stream_until_it_ends(node, model, runner, signal.SIGKILL, replies)
        assert error["code"] == "runner_failed" and "delete the instance" in error["message"], error
        queued.join(30)
        [reply] = replies
        assert reply.status_code == 503 and "killed by SIGKILL" in reply.json()["error"]["message"], reply.text
        [record] = node.state()["instances"].values()
        assert record["status"] == "failed" and "killed by SIGKILL" in record["error"], record
    finally:
        assert stop_node(node) == 0, node.log()
