"""A stage of a two-node ring that stops answering (SIGSTOP) mid-stream: the stream ends with an error event within
the stall time, the ring is torn down (the stopped stage killed) and formed again on the same nodes, and it serves."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.processes import LOAD_TIMEOUT_S, Cluster, wait_until
from tests.support.streams import LONG, chat_body

pytestmark = pytest.mark.slow
STALL_S = 5
MODEL = "SmolLM2-135M-Instruct"


def test_a_hung_ring_stage_ends_its_stream_and_the_ring_is_formed_again(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, env={"RINGLET_RUNNER_STALL_S": str(STALL_S), "RINGLET_CPU_COMPILE": "0"})
    stopped = None
    try:
        first, second = cluster.start("r1", "r2")
        cluster.wait_agreed(2)
        ring = [first.node_id, second.node_id]
        created = first.post("/instance", json={"model": MODEL, "instance_type": "CpuRing", "nodes": ring})
        assert created.status_code == 201, created.text
        old = created.json()["instance"]["instance_id"]
        assert first.wait_for_instance(old)["status"] == "ready", cluster.logs()
        stopped = first.state()["instances"][old]["runners"][second.node_id]["pid"]

        with httpx.Client(timeout=120) as client, \
                client.stream("POST", first.url + "/v1/chat/completions", json=chat_body(MODEL, LONG, True)) as reply:
            assert reply.status_code == 200
            lines = (line for line in reply.iter_lines() if line.startswith("data: "))
            next(lines)
            os.kill(stopped, signal.SIGSTOP)  # the second stage hangs
            signalled = time.monotonic()
            events = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
        ended_after = time.monotonic() - signalled
        assert "error" in events[-1], events[-3:]
        assert ended_after < STALL_S + 10, ended_after

        def formed_again() -> dict | None:
            ready = [r for i, r in first.state()["instances"].items() if i != old and r["status"] == "ready"]
            return ready[0] if ready else None

        wait_until(formed_again, LOAD_TIMEOUT_S, "the ring formed again", cluster.logs, poll_s=0.5)
        new = formed_again()
        assert new is not None and [s["node_id"] for s in new["instance"]["shards"]] == ring
        assert old not in first.state()["instances"]
        wait_until(lambda: not psutil.pid_exists(stopped) or psutil.Process(stopped).status() == psutil.STATUS_ZOMBIE,
                   30, "the stopped stage killed", cluster.logs)
        answer = second.post("/v1/chat/completions", json=chat_body(MODEL, 4, False))
        assert answer.status_code == 200, answer.text
    finally:
        if stopped is not None and psutil.pid_exists(stopped):
            os.kill(stopped, signal.SIGKILL)
        cluster.close()
