"""A model whose chat template never ends (it came with the model, so it may be hostile): a live node cuts the
render off, answers a 400 that names the template, and its instance goes on serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import start_node, stop_node

pytestmark = pytest.mark.slow

# a loop of 10**12 steps; then, were it allowed to finish, text far over any output limit
ENDLESS = "{% for i in range(1000000) %}{% for j in range(1000000) %}{{ messages[0]['content'] }}{% endfor %}{% endfor %}"


def test_an_endless_chat_template_is_a_400_and_the_instance_keeps_serving(tmp_path: Path,
                                                                          tiny_checkpoint: dict[str, bytes]) -> None:
    model = tmp_path / "hostile"
    for name, data in tiny_checkpoint.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(data)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": ENDLESS}))
    node = start_node(tmp_path, "host", "--model", str(model))
    try:
        (instance_id,) = node.state()["instances"]
        ready = node.wait_for_instance(instance_id)
        assert ready["status"] == "ready", ready
        model_id = ready["instance"]["model"]
        chat = {"model": model_id, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        for _ in range(2):
            began = time.monotonic()
            reply = httpx.post(node.url + "/v1/chat/completions", json=chat, timeout=60)
            assert reply.status_code == 400, reply.text
            assert "chat template" in reply.json()["error"]["message"], reply.text
            assert time.monotonic() - began < 30, "the render was cut off within its time limit"
        plain = httpx.post(node.url + "/v1/completions", json={"model": model_id, "prompt": "hello world",
                                                               "max_tokens": 4, "temperature": 0}, timeout=60)
        assert plain.status_code == 200, plain.text
        assert plain.json()["usage"]["completion_tokens"] >= 1
    finally:
        stop_node(node)
