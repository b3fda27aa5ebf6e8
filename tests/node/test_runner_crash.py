"""A runner that dies (here: SIGKILL, as the OOM killer would) ends its requests with an error and is started again,
never taking the node with it; deleting an instance ends its requests too. Both on instances of their own,
addressed by instance id. (tests/node/test_runner_watchdog.py: a stopped runner, queued requests, the restart
limit.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.processes import LOAD_TIMEOUT_S, LiveNode, wait_until

pytestmark = pytest.mark.slow

LONG_STORY = {"max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "Write a long story."}]}


@pytest.fixture(scope="module")
def spare_instances(live_node: LiveNode, model_id: str) -> Iterator[list[str]]:
    """Two more instances of the model on the session node (loading side by side), deleted afterwards."""
    created = [live_node.post("/instance", json={"model": model_id, "instance_type": "CpuRing"}) for _ in range(2)]
    assert all(r.status_code == 201 for r in created), [r.text for r in created]
    instance_ids = [r.json()["instance"]["instance_id"] for r in created]
    try:
        for instance_id in instance_ids:
            assert live_node.wait_for_instance(instance_id)["status"] == "ready"
        yield instance_ids
    finally:
        for instance_id in instance_ids:
            httpx.delete(f"{live_node.url}/instance/{instance_id}")


def test_killed_runner_ends_the_stream_with_an_error_and_comes_back(
        live_node: LiveNode, model_id: str, spare_instances: list[str]) -> None:
    instance_id = spare_instances[0]
    (runner,) = live_node.get(f"/instance/{instance_id}").json()["runners"].values()
    events: list[str] = []

    def kill_after_first_tokens() -> None:
        while len(events) < 3:
            time.sleep(0.01)
        os.kill(runner["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_tokens)
    killer.start()
    began = time.monotonic()
    with httpx.stream("POST", live_node.url + "/v1/chat/completions", json={**LONG_STORY, "model": instance_id},
                      timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
    killer.join()
    assert time.monotonic() - began < 30, "the stream hung after the runner died"
    assert '"error"' in events[-1] and "killed by SIGKILL" in events[-1], events[-1]
    assert "starting again" in events[-1], events[-1]
    assert not any("[DONE]" in e for e in events)

    def back_again() -> bool:
        record = live_node.get(f"/instance/{instance_id}").json()
        pids = [r["pid"] for r in record["runners"].values()]
        return record["status"] == "ready" and pids != [runner["pid"]] and None not in pids

    wait_until(back_again, LOAD_TIMEOUT_S, "the runner started again", live_node.log)
    again = live_node.post("/v1/chat/completions", json={**LONG_STORY, "model": instance_id, "stream": False,
                                                         "max_tokens": 2})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 2
    # the node and its other instances went on serving
    answer = live_node.post("/v1/chat/completions", json={**LONG_STORY, "model": model_id, "stream": False,
                                                          "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


def test_deleting_an_instance_ends_its_requests(live_node: LiveNode, spare_instances: list[str]) -> None:
    instance_id = spare_instances[1]
    with httpx.stream("POST", live_node.url + "/v1/chat/completions", json={**LONG_STORY, "model": instance_id},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        deleted = httpx.delete(f"{live_node.url}/instance/{instance_id}")
        assert deleted.json() == {"instance_id": instance_id, "deleted": True}
        rest = [line for line in lines if line.startswith("data: ")]
    assert "was deleted" in rest[-1]
    assert instance_id not in live_node.get("/state").json()["instances"]
