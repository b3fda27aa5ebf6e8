"""Ollama's model lifecycle on a real node, through its --ollama-port: keep_alive 0 unloads the instance once its
answer is out, a request for a model the node holds loads it again (with the request's num_ctx as its context window)
and waits for it, and an empty prompt loads (or, with keep_alive 0, unloads); `ringlet run` answers through the node
and `ringlet stop` unloads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ollama
import pytest

from tests.support.processes import LOAD_TIMEOUT_S, LiveNode, free_port, start_node, stop_node, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringlet", *args], check=False, capture_output=True, text=True,
                          timeout=LOAD_TIMEOUT_S)


def instances(node: LiveNode) -> list[dict]:
    return list(node.state()["instances"].values())


@pytest.mark.slow
def test_keep_alive_unloads_and_a_request_loads_the_model_again(tmp_path: Path) -> None:
    ollama_port = free_port()
    node = start_node(tmp_path, "keep-alive", "--ollama-port", str(ollama_port), env={"RINGLET_CPU_COMPILE": "0"})
    try:
        wait_until(lambda: [i for i in instances(node) if i["status"] == "ready"], LOAD_TIMEOUT_S,
                   "the default instance ready", node.log)
        [first] = instances(node)
        model = first["instance"]["model"]
        # the same API on the Ollama port the node was given
        client = ollama.Client(host=f"http://127.0.0.1:{ollama_port}", timeout=LOAD_TIMEOUT_S)

        reply = client.chat(model=model, messages=QUESTION, options={"temperature": 0, "num_predict": 8},
                            keep_alive=0)
        assert reply.message.content
        wait_until(lambda: not instances(node), 10, "the instance unloaded after its answer", node.log)

        # nothing serves the model now, but its file is here: the request loads it, with its num_ctx, and waits
        reply = client.chat(model=model, messages=QUESTION, options={"temperature": 0, "num_predict": 8,
                                                                     "num_ctx": 1024})
        assert reply.message.content and "loads for a request" in node.log()
        [again] = instances(node)
        assert again["instance"]["instance_id"] != first["instance"]["instance_id"]
        assert again["instance"]["context_length"] == 1024
        assert {r["context_length"] for r in again["runners"].values()} == {1024}  # what its engine holds

        assert client.generate(model=model, prompt="", keep_alive=0).done_reason == "unload"
        wait_until(lambda: not instances(node), 10, "the instance unloaded by an empty prompt", node.log)
        assert client.generate(model=model, prompt="", keep_alive="1h").done_reason == "load"
        assert [i["status"] for i in instances(node)] == ["ready"]

        # the CLI through the node: `ringlet run` answers there, `ringlet stop` unloads
        ran = cli("run", "--url", node.url, model, "What is the capital of France?", "--max-tokens", "12")
        assert ran.returncode == 0 and "Paris" in ran.stdout, ran.stderr
        stopped = cli("stop", model, "--url", node.url)
        assert stopped.returncode == 0 and "unloaded" in stopped.stdout, stopped.stderr
        wait_until(lambda: not instances(node), 10, "the instance unloaded by ringlet stop", node.log)
    finally:
        assert stop_node(node) == 0, node.log()
