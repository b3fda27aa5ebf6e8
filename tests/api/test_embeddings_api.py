"""The embeddings endpoints' contract, against a fake node: every input form OpenAI documents becomes one task with
all the inputs, base64 carries the same float32 values, bad input is a 400 naming `input`, and Ollama's empty input
only loads the model."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.tasks import MAX_EMBEDDING_INPUTS, EmbeddingTask
from tests.support.fake_node import FAKE_DIMENSIONS, FakeNode


def _post(url: str, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(url + path, json={"model": EMBEDDED_MODEL_ID, **body}, timeout=30)


@pytest.mark.parametrize(("given", "inputs"), [
    ("one text", ["one text"]),
    (["a", "b c"], ["a", "b c"]),
    ([5, 6, 7], [[5, 6, 7]]),
    ([[5, 6], [7]], [[5, 6], [7]]),
], ids=["text", "texts", "token ids", "lists of token ids"])
def test_every_input_form_is_one_task_with_all_inputs(url: str, node: FakeNode, given: object,
                                                      inputs: list[object]) -> None:
    reply = _post(url, "/v1/embeddings", {"input": given, "encoding_format": "float"})
    assert reply.status_code == 200, reply.text
    (task,) = node.submitted
    assert isinstance(task, EmbeddingTask) and task.inputs == inputs and task.truncate
    body = reply.json()
    assert body["object"] == "list" and body["model"] == EMBEDDED_MODEL_ID
    assert [d["index"] for d in body["data"]] == list(range(len(inputs)))
    assert all(len(d["embedding"]) == FAKE_DIMENSIONS for d in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_base64_carries_the_same_float32_values(url: str, node: FakeNode) -> None:
    floats = _post(url, "/v1/embeddings", {"input": ["x y", "z"], "encoding_format": "float"}).json()["data"]
    packed = _post(url, "/v1/embeddings", {"input": ["x y", "z"], "encoding_format": "base64"}).json()["data"]
    for as_floats, as_base64 in zip(floats, packed, strict=True):
        raw = base64.b64decode(as_base64["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert list(decoded) == [struct.unpack("<f", struct.pack("<f", v))[0] for v in as_floats["embedding"]]


@pytest.mark.parametrize("given", ["", [], [""], [[]], ["a", 1], [[1], "a"], [-1], [None]],
                         ids=["empty text", "no inputs", "an empty text", "empty ids", "mixed", "mixed lists",
                              "negative id", "null"])
def test_bad_input_is_a_400_naming_input(url: str, node: FakeNode, given: object) -> None:
    reply = _post(url, "/v1/embeddings", {"input": given})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"].split(".")[0] == "input"
    assert not node.submitted


def test_too_many_inputs_and_unknown_fields_are_400s(url: str, node: FakeNode) -> None:
    many = _post(url, "/v1/embeddings", {"input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)})
    assert many.status_code == 400 and many.json()["error"]["param"].split(".")[0] == "input"
    unknown = _post(url, "/v1/embeddings", {"input": "a", "pooling": "mean"})
    assert unknown.status_code == 400 and "pooling" in unknown.json()["error"]["message"]
    too_big = _post(url, "/v1/embeddings", {"input": "a", "dimensions": FAKE_DIMENSIONS + 1})
    assert too_big.status_code == 400 and "dimensions" in too_big.json()["error"]["message"]
    missing = httpx.post(url + "/v1/embeddings", json={"model": "no-such-model", "input": "a"}, timeout=30)
    assert missing.status_code == 404


def test_ollama_embed_takes_truncate_and_dimensions_and_keeps_alive(url: str, node: FakeNode) -> None:
    reply = _post(url, "/api/embed", {"input": ["a b", "c"], "truncate": False, "dimensions": 4, "keep_alive": "1m"})
    assert reply.status_code == 200, reply.text
    (task,) = node.submitted
    assert isinstance(task, EmbeddingTask) and not task.truncate and task.dimensions == 4
    body = reply.json()
    assert [len(v) for v in body["embeddings"]] == [4, 4] and body["prompt_eval_count"] == 3
    assert node.kept_alive[-1][1] == 60.0


@pytest.mark.parametrize(("path", "body", "answer"), [
    ("/api/embed", {"input": ""}, {"embeddings": []}),
    ("/api/embed", {"input": []}, {"embeddings": []}),
    ("/api/embeddings", {"prompt": ""}, {"embedding": []}),
])
def test_ollama_empty_input_only_loads_the_model(url: str, node: FakeNode, path: str, body: dict[str, object],
                                                 answer: dict[str, object]) -> None:
    reply = _post(url, path, body)
    assert reply.status_code == 200, reply.text
    assert answer.items() <= reply.json().items()
    assert not node.submitted and node.kept_alive, "no task; the instance's keep-alive starts"


def test_ollama_errors_have_ollamas_shape(url: str, node: FakeNode) -> None:
    reply = _post(url, "/api/embed", {"input": [""]})
    assert reply.status_code == 400 and "input" in reply.json()["error"]
