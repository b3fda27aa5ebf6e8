"""Models by Ollama's names through the official `ollama` client: a library name (`qwen3:0.6b`) pulled from the fake
hub as the GGUF repo and quantisation ringlet maps it to, then known by that name to /api/show, placement (what the
dashboard sends), /api/chat and /v1/chat/completions; /api/copy gives it a second name that shares its files, and
/api/delete removes a name alone or the model with its names."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from ringlet.api.app import create_app
from ringlet.models.download import DownloadManager
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.models.ollama import library_model
from ringlet.models.store import ModelStore
from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.fake_node import FakeNode, serving
from tests.support.tiny_gguf import write_tiny_gguf

REPO = "Qwen/Qwen3-0.6B-GGUF"  # where ringlet's table sends qwen3:0.6b
FILE = "Qwen3-0.6B-Q8_0.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class Served:
    node: FakeNode
    url: str
    client: ollama.Client


@pytest.fixture
def served(hub: FakeHub, tmp_path: Path) -> Iterator[Served]:
    """A fake node whose downloads reach the fake hub, which serves a tiny Qwen3 GGUF under the mapped repo."""
    write_tiny_gguf(tmp_path / FILE, arch="qwen3")
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, arch="qwen3", seed=1)
    hub.repos[REPO] = HubRepo({FILE: (tmp_path / FILE).read_bytes(), "Qwen3-0.6B-f16.gguf": other.read_bytes(),
                               "README.md": b"# tiny\n"})
    node = FakeNode(tmp_path / "unused-store")
    node.downloads.close()
    node.downloads = DownloadManager(on_update=node._download_changed)  # the default store, the hub of HF_ENDPOINT
    try:
        with serving(create_app(node)) as url:
            yield Served(node, url, ollama.Client(host=url, timeout=60))
    finally:
        node.downloads.close()


def test_the_library_table_maps_names_and_tags() -> None:
    assert library_model("qwen3:0.6b") is not None and library_model("qwen3:0.6b").ref == f"{REPO}:Q8_0"
    latest = library_model("qwen3")
    assert latest is not None and latest.ref == "Qwen/Qwen3-8B-GGUF:Q4_K_M"
    quant = library_model("llama3.2:3b-instruct-q8_0")
    assert quant is not None and quant.ref == "bartowski/Llama-3.2-3B-Instruct-GGUF:Q8_0"
    for other in ("gemma3", "qwen3:30b", "someone/qwen3:8b", "Qwen/Qwen3-8B-GGUF:Q4_K_M", "qwen3:8b-bad"):
        assert library_model(other) is None, other


def test_a_library_name_is_pulled_shown_placed_and_chatted_with(served: Served) -> None:
    client, node = served.client, served.node
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("qwen3:0.6b")
    assert missing.value.status_code == 404 and "`ringlet pull qwen3:0.6b`" in missing.value.error

    progress = list(client.pull("qwen3:0.6b", stream=True))
    assert progress[-1].status == "success" and all(p.status == f"pulling {REPO}:Q8_0" for p in progress[:-1])
    stored = ModelStore().get(REPO)
    assert stored is not None and stored.gguf_files == [FILE], "only the mapped quantisation is fetched"

    shown = client.show("qwen3:0.6b")
    assert shown.details is not None and shown.details.family == "qwen3" and shown.details.format == "gguf"
    assert shown.modelinfo is not None and shown.modelinfo["general.name"] == REPO

    # placed by that name (the dashboard sends the id it lists, which is the same model)
    placed = httpx.post(served.url + "/instance", json={"model": "qwen3:0.6b", "instance_type": "CpuRing"})
    assert placed.status_code == 201, placed.text
    instance_id = placed.json()["instance"]["instance_id"]
    assert placed.json()["instance"]["model"] == REPO
    node.make_ready(instance_id)

    reply = client.chat(model="qwen3:0.6b", messages=QUESTION)
    assert reply.message.content == "The capital of France is Paris." and node.submitted[-1].model == "qwen3:0.6b"
    answer = openai.OpenAI(base_url=served.url + "/v1", api_key="unused").chat.completions.create(
        model="qwen3:0.6b", messages=QUESTION)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "The capital of France is Paris."
    assert f"{REPO}:latest" in {m.model for m in client.ps().models}


def test_copy_names_a_model_without_copying_its_files(served: Served) -> None:
    client = served.client
    client.pull("qwen3:0.6b")
    size = ModelStore().get(REPO).size_bytes

    assert client.copy("qwen3:0.6b", "my-qwen").status == "success"
    listed = {m.model: m for m in client.list().models}
    assert listed["my-qwen:latest"].digest == listed[f"{REPO}:latest"].digest
    assert client.show("my-qwen").modelinfo["general.name"] == REPO
    assert ModelStore().get(REPO).size_bytes == size, "a copy takes no space"
    assert client.copy(EMBEDDED_MODEL_ID, "tiny:latest").status == "success"
    assert client.show("tiny").modelinfo["general.name"] == EMBEDDED_MODEL_ID

    for source, destination, status, says in [
            ("no-such-model", "x", 404, "not found"),
            ("qwen3:8b", "x", 404, "not pulled yet"),
            ("qwen3:0.6b", "bad name!", 400, "cannot be a model name"),
            ("qwen3:0.6b", EMBEDDED_MODEL_ID, 400, "names the model"),
    ]:
        with pytest.raises(ollama.ResponseError) as refused:
            client.copy(source, destination)
        assert refused.value.status_code == status and says in refused.value.error, (source, destination)

    # deleting a name leaves the model; deleting the model takes its names with it
    assert client.delete("my-qwen").status == "success"
    assert ModelStore().get(REPO) is not None
    with pytest.raises(ollama.ResponseError) as gone:
        client.show("my-qwen")
    assert gone.value.status_code == 404
    client.copy("qwen3:0.6b", "again")
    assert client.delete("qwen3:0.6b").status == "success"
    assert ModelStore().get(REPO) is None
    assert not {"again:latest", f"{REPO}:latest"} & {m.model for m in client.list().models}
    assert "tiny:latest" in {m.model for m in client.list().models}
