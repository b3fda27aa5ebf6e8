"""`ringlet chat` and `ringlet ps` against the live node, as a person would run them."""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import LiveNode, free_port


def ringlet(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringlet", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=False)


def test_ps_lists_the_instance_and_the_node(live_node: LiveNode, model_id: str) -> None:
    result = ringlet("ps", "--url", live_node.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["INSTANCE", "MODEL", "TYPE", "STATUS", "TASKS", "STAGES"]
    assert model_id in lines[1] and "CpuRing" in lines[1] and "ready" in lines[1] and "[0:30] pid " in lines[1]
    assert any(line.startswith("NODE") for line in lines) and any("cpu" in line for line in lines[3:])


def test_chat_streams_answers_and_keeps_the_conversation(live_node: LiveNode) -> None:
    result = ringlet("chat", "--url", live_node.url, "--temperature", "0", "--max-tokens", "12",
                     stdin="What is the capital of France?\n/reset\nAnd of Germany?\n")
    assert result.returncode == 0, result.stderr
    answers = result.stdout.strip().splitlines()
    assert len(answers) == 2 and "Paris" in answers[0]


def test_cli_errors_say_what_to_do(live_node: LiveNode) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    result = ringlet("ps", "--url", nobody)
    assert result.returncode == 2 and "start one with `ringlet node`" in result.stderr
    unknown = ringlet("chat", "--url", live_node.url, "--model", "no-such-model", stdin="hi\n")
    assert unknown.returncode == 2 and "404" in unknown.stderr and "available models" in unknown.stderr
