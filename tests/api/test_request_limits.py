"""Requests stay within bounds: a stop string is at most MAX_STOP_CHARS characters (the text held back while it may
begin is that long), on the OpenAI and Ollama APIs alike; a request over it is a 400 naming the field, and nothing
is submitted."""

from __future__ import annotations

import httpx

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.tasks import MAX_STOP_CHARS
from tests.support.fake_node import FakeNode

LONG = "x" * (MAX_STOP_CHARS + 1)


def test_an_overlong_stop_string_is_a_400_and_nothing_runs(url: str, node: FakeNode) -> None:
    messages = [{"role": "user", "content": "hi"}]
    for body in ({"stop": LONG}, {"stop": ["ok", LONG]}):
        reply = httpx.post(url + "/v1/chat/completions", json={"model": EMBEDDED_MODEL_ID, "messages": messages, **body})
        assert reply.status_code == 400 and "stop" in reply.text, reply.text
    ollama = httpx.post(url + "/api/chat", json={"model": EMBEDDED_MODEL_ID, "messages": messages,
                                                 "options": {"stop": [LONG]}})
    assert ollama.status_code == 400 and "stop" in ollama.json()["error"]
    assert node.submitted == []
    fits = httpx.post(url + "/v1/chat/completions", json={"model": EMBEDDED_MODEL_ID, "messages": messages,
                                                          "stop": "x" * MAX_STOP_CHARS, "max_tokens": 2})
    assert fits.status_code == 200
