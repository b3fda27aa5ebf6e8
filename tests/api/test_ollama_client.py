"""The official `ollama` client against a live node serving the embedded model."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.support.processes import LiveNode


@pytest.fixture(scope="module")
def client(live_node: LiveNode) -> ollama.Client:
    return ollama.Client(host=live_node.url, timeout=120)


def test_list_shows_the_embedded_model(client: ollama.Client, model_id: str) -> None:
    names = [m.model for m in client.list().models]
    assert f"{model_id}:latest" in names
    model = next(m for m in client.list().models if m.model == f"{model_id}:latest")
    assert model.size and model.details and model.details.family == "llama"


def test_chat(client: ollama.Client, model_id: str) -> None:
    reply = client.chat(model=f"{model_id}:latest", options={"temperature": 0, "num_predict": 12},
                        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (reply.message.content or "")
    assert reply.done and reply.done_reason in ("stop", "length") and reply.eval_count


def test_chat_streams_lines(client: ollama.Client, model_id: str) -> None:
    parts = list(client.chat(model=model_id, stream=True, options={"temperature": 0, "num_predict": 12},
                             messages=[{"role": "user", "content": "What is the capital of France?"}]))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "Paris" in "".join(p.message.content or "" for p in parts)
    assert parts[-1].prompt_eval_count and parts[-1].eval_count


def test_generate(client: ollama.Client, model_id: str) -> None:
    reply = client.generate(model=model_id, prompt="What is the capital of France?",
                            options={"temperature": 0, "num_predict": 12})
    assert "Paris" in (reply.response or "") and reply.done
    raw = list(client.generate(model=model_id, prompt="1, 2, 3,", raw=True, stream=True,
                               options={"temperature": 0, "num_predict": 3}))
    assert raw[-1].done and raw[-1].eval_count == 3
    loaded = client.generate(model=model_id, prompt="")
    assert loaded.done and loaded.done_reason == "load"


def test_unknown_model_is_a_response_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404 and "no-such-model" in str(error.value.error)


def test_version_and_curl_style_bodies(live_node: LiveNode, model_id: str) -> None:
    assert live_node.get("/api/version").json()["version"]
    # `curl -d` sends form encoding; Ollama reads the body as JSON anyway
    body = json.dumps({"model": model_id, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    reply = httpx.post(live_node.url + "/api/generate", content=body, timeout=60,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 200 and reply.json()["done"] is True
