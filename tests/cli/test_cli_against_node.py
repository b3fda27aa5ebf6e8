"""`ringlet chat` and `ringlet ps` as a person runs them (real processes), against a fake node's API: what they
show, what they send, and their errors."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import httpx

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.errors import TaskError
from ringlet.shared.tasks import ChatMessage
from tests.support.fake_node import REPLY, RUNNER_PID, FakeNode
from tests.support.processes import free_port

ANSWER = "".join(REPLY)


def ringlet(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringlet", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def test_ps_lists_the_instances_their_tasks_and_the_nodes(url: str, node: FakeNode) -> None:
    node.script, node.token_delay_s = lambda: itertools.repeat(" on"), 0.005
    body = {"model": EMBEDDED_MODEL_ID, "messages": [{"role": "user", "content": "Go on."}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as reply:
        events = reply.iter_lines()  # the task is in flight while this iterator lives (closing it closes the stream)
        assert next(events).startswith("data: ")
        result = ringlet("ps", "--url", url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["INSTANCE", "MODEL", "TYPE", "STATUS", "TASKS", "IDLE", "UNTIL", "SIZE", "PROCESSOR",
                                "CONTEXT", "ENGINE", "STAGES"]
    (instance_id,) = node.state.instances
    size = sum(node.state.instances[instance_id].memory_bytes.values()) / 1024**3
    assert lines[1].split() == [instance_id, EMBEDDED_MODEL_ID, "CpuRing", "ready", "1", "busy", "forever",
                                f"{size:.2f}", "GiB", "100%", "CPU", "8192", "cpu", "fake-node[0:30]", "pid",
                                str(RUNNER_PID)]
    assert lines[2] == "" and lines[3].split() == ["NODE", "NAME", "ENGINES", "SELECTED", "FREE", "MEMORY"]
    assert lines[4].split() == [node.node_id, "fake-node", "cpu", "cpu", "8.0", "GiB"]

    # once the answer is out: idle since then, and unloaded after the keep_alive a request set
    httpx.post(url + "/api/chat", json={"model": EMBEDDED_MODEL_ID, "messages": body["messages"], "stream": False,
                                        "keep_alive": "5m", "options": {"num_predict": 2}}, timeout=30)
    idle, until = ringlet("ps", "--url", url).stdout.splitlines()[1].split()[5:7]
    assert re.fullmatch(r"\d+s", idle) and int(idle[:-1]) < 30 and until in ("4m", "5m"), (idle, until)


def test_chat_streams_answers_and_keeps_the_conversation(url: str, node: FakeNode) -> None:
    result = ringlet("chat", "--url", url, "--temperature", "0", "--max-tokens", "12", "--system", "Be brief.",
                     stdin="What is the capital of France?\nAnd of Germany?\n/reset\nAnd of Italy?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [ANSWER] * 3
    system = ChatMessage(role="system", content="Be brief.")
    first = ChatMessage(role="user", content="What is the capital of France?")
    assert [task.messages for task in node.submitted] == [
        [system, first],
        [system, first, ChatMessage(role="assistant", content=ANSWER),
         ChatMessage(role="user", content="And of Germany?")],
        [system, ChatMessage(role="user", content="And of Italy?")],
    ], "/reset forgets the conversation but keeps the system message"
    assert all(task.model == EMBEDDED_MODEL_ID and task.max_tokens == 12 and task.sampling.greedy
               for task in node.submitted), "the first model with a ready instance, and the flags"


def test_cli_errors_say_what_to_do(url: str, node: FakeNode) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    result = ringlet("ps", "--url", nobody)
    assert result.returncode == 2 and "start one with `ringlet node`" in result.stderr
    unknown = ringlet("chat", "--url", url, "--model", "no-such-model", stdin="hi\n")
    assert unknown.returncode == 2 and "404" in unknown.stderr and "available models" in unknown.stderr
    node.script = lambda: ["The", TaskError("runner_failed", "the runner of the instance exited with -9")]
    failed = ringlet("chat", "--url", url, stdin="hi\n")
    assert failed.returncode == 2 and failed.stdout == "The"
    assert failed.stderr.strip() == "ringlet: error: the runner of the instance exited with -9"
