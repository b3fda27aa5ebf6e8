"""A live node serving a random Qwen3-Embedding-shaped checkpoint answers the official openai and ollama clients'
(and `ringlet embed`'s) embedding calls with what transformers computes; a generation-only model (the embedded one)
is a 400 that names it. In a cluster, a request to another node is forwarded to the node that serves the model, and
an instance split over nodes computes embeddings down its ring, its last stage pooling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import torch

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from tests.support.embedding_models import embedding_checkpoint, reference_embeddings, token_ids
from tests.support.processes import Cluster, LiveNode, start_node, stop_node

pytestmark = pytest.mark.slow

TEXTS = ["Hello world", "The capital of France is Paris.", "Embeddings turn text into vectors of numbers."]
TOLERANCE = 2e-5  # fp32 on both sides; batching and kernel choices move the last bits
ENV = {"RINGLET_PRECISION": "fp32", "RINGLET_CPU_COMPILE": "0"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedding_checkpoint(tmp_path_factory.mktemp("embedding") / "qwen3-embedding-tiny")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[tuple[LiveNode, str]]:
    """The node and the id of the model its instance serves."""
    node = start_node(tmp_path_factory.mktemp("node"), "embedder", "--model", str(checkpoint), env=ENV)
    try:
        (instance_id,) = node.state()["instances"]
        ready = node.wait_for_instance(instance_id)
        assert ready["status"] == "ready", ready
        yield node, ready["instance"]["model"]
    finally:
        stop_node(node)


def _openai(node: LiveNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_embeddings_equal_transformers(served: tuple[LiveNode, str], checkpoint: Path) -> None:
    node, model = served
    expected = reference_embeddings(checkpoint, TEXTS)
    client = _openai(node)
    as_base64 = client.embeddings.create(model=model, input=TEXTS)  # the client asks for base64 and decodes it
    as_floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    for answer in (as_base64, as_floats):
        assert [d.index for d in answer.data] == [0, 1, 2]
        torch.testing.assert_close(torch.tensor([d.embedding for d in answer.data]), expected, atol=TOLERANCE,
                                   rtol=0)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(
            len(token_ids(checkpoint, t)) for t in TEXTS)
    ids = client.embeddings.create(model=model, input=token_ids(checkpoint, TEXTS[1]), encoding_format="float")
    torch.testing.assert_close(torch.tensor(ids.data[0].embedding), expected[1], atol=TOLERANCE, rtol=0)
    cut = client.embeddings.create(model=model, input=TEXTS[0], dimensions=16, encoding_format="float")
    torch.testing.assert_close(torch.tensor(cut.data[0].embedding),
                               reference_embeddings(checkpoint, TEXTS[:1], dimensions=16)[0], atol=TOLERANCE, rtol=0)
    with pytest.raises(openai.BadRequestError, match="dimensions 65 is more than the model's 64"):
        client.embeddings.create(model=model, input="x", dimensions=65)


def test_ollama_client_embed_and_embeddings_equal_transformers(served: tuple[LiveNode, str],
                                                               checkpoint: Path) -> None:
    node, model = served
    expected = reference_embeddings(checkpoint, TEXTS)
    client = ollama.Client(host=node.url, timeout=60)
    answer = client.embed(model=model, input=TEXTS, keep_alive="10m")
    torch.testing.assert_close(torch.tensor(answer.embeddings), expected, atol=TOLERANCE, rtol=0)
    assert answer.prompt_eval_count == sum(len(token_ids(checkpoint, t)) for t in TEXTS)
    one = client.embed(model=model, input=TEXTS[2])
    torch.testing.assert_close(torch.tensor(one.embeddings), expected[2:], atol=TOLERANCE, rtol=0)
    legacy = client.embeddings(model=model, prompt=TEXTS[0])
    torch.testing.assert_close(torch.tensor(legacy.embedding), expected[0], atol=TOLERANCE, rtol=0)
    assert client.embed(model=model, input=[]).embeddings == []  # only loads the model, as Ollama does
    long = "word " * 600  # more tokens than the checkpoint's 512 positions
    assert len(client.embed(model=model, input=long).embeddings[0]) == 64
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=model, input=long, truncate=False)
    assert refused.value.status_code == 400 and "context window is 512" in refused.value.error


def test_the_cli_prints_the_embeddings(served: tuple[LiveNode, str], checkpoint: Path) -> None:
    node, model = served
    result = subprocess.run([sys.executable, "-m", "ringlet", "embed", "--url", node.url, "--model", model, *TEXTS],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    printed = torch.tensor([json.loads(line) for line in result.stdout.splitlines()])
    torch.testing.assert_close(printed, reference_embeddings(checkpoint, TEXTS), atol=TOLERANCE, rtol=0)


def test_a_generation_model_is_a_400_that_names_it(served: tuple[LiveNode, str]) -> None:
    node, _ = served
    client = ollama.Client(host=node.url, timeout=300)
    with pytest.raises(ollama.ResponseError) as refused:  # Ollama's way: the model loads for the request first
        client.embed(model=EMBEDDED_MODEL_ID, input="hello")
    assert refused.value.status_code == 400
    assert f"model '{EMBEDDED_MODEL_ID}' is not an embedding model" in refused.value.error
    with pytest.raises(openai.BadRequestError, match="is not an embedding model"):
        _openai(node).embeddings.create(model=EMBEDDED_MODEL_ID, input=["hello", "world"])
    chat = httpx.post(node.url + "/v1/completions", json={"model": EMBEDDED_MODEL_ID, "prompt": "Hello",
                                                          "max_tokens": 2}, timeout=60)
    assert chat.status_code == 200, "the model still generates"


def test_a_request_to_another_node_is_forwarded_and_a_split_instance_pools_on_its_last_stage(
        tmp_path: Path, checkpoint: Path) -> None:
    store = tmp_path / "home" / "models" / "ringlet-test"  # the cluster's nodes share RINGLET_HOME: both resolve it
    for name in ("embedding", "split-embedding"):
        shutil.copytree(checkpoint, store / name)
    cluster = Cluster(tmp_path, env={"RINGLET_CPU_COMPILE": "0"})
    try:
        holder, asker = cluster.start("holder", "asker")
        cluster.wait_agreed(2)
        ids = [holder.node_id, asker.node_id]
        model, split_model = "ringlet-test/embedding", "ringlet-test/split-embedding"
        whole = holder.post("/instance", json={"model": model, "instance_type": "CpuRing", "nodes": ids[:1]})
        split = holder.post("/instance", json={"model": split_model, "instance_type": "CpuRing", "nodes": ids})
        assert whole.status_code == split.status_code == 201, (whole.text, split.text)
        records = [holder.wait_for_instance(r.json()["instance"]["instance_id"]) for r in (whole, split)]
        assert [r["status"] for r in records] == ["ready", "ready"], cluster.logs()
        assert len(records[1]["runners"]) == 2, "split over both nodes"
        expected = reference_embeddings(checkpoint, TEXTS)
        answer = _openai(asker).embeddings.create(model=model, input=TEXTS, encoding_format="float")
        torch.testing.assert_close(torch.tensor([d.embedding for d in answer.data]), expected, atol=TOLERANCE, rtol=0)
        # on the ring, while a generation streams on it: its steps in flight come back, then the inputs go down
        body = {"model": split_model, "prompt": "Hello world", "max_tokens": 48, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", asker.url + "/v1/completions", json=body, timeout=120) as stream:
            events = stream.iter_lines()
            assert next(events).startswith("data: ")
            on_ring = _openai(holder).embeddings.create(model=split_model, input=TEXTS, encoding_format="float")
            rest = [line for line in events if line.startswith("data: ")]
        torch.testing.assert_close(torch.tensor([d.embedding for d in on_ring.data]), expected, atol=TOLERANCE,
                                   rtol=0)
        assert rest[-1] == "data: [DONE]" and '"completion_tokens"' in rest[-2], "the generation went on to its end"
        ids_on_ring = _openai(asker).embeddings.create(model=split_model, input=[token_ids(checkpoint, TEXTS[1])],
                                                       encoding_format="float", dimensions=16)
        torch.testing.assert_close(torch.tensor(ids_on_ring.data[0].embedding),
                                   reference_embeddings(checkpoint, TEXTS[1:2], dimensions=16)[0], atol=TOLERANCE,
                                   rtol=0)
    finally:
        cluster.close()
