"""Ollama's model endpoints: /api/show and /api/ps through the official client against the fake node, /api/version,
and /api/pull (NDJSON progress), /api/show of the pulled model (known by name from the store), then /api/delete on a
real node's store against the fake hub."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import pytest

from ringlet.api.app import create_app
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.models.store import ModelStore
from ringlet.node import Node
from tests.support.fake_hub import FakeHub
from tests.support.fake_node import FakeNode
from tests.support.hub import REPO_ID
from tests.support.node_infos import node_info


@pytest.fixture
def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=30)


def test_show_describes_the_model(client: ollama.Client) -> None:
    shown = client.show(EMBEDDED_MODEL_ID)
    assert shown.details is not None and shown.details.family == "llama" and shown.details.format == "gguf"
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["llama.block_count"] == 30 and "tools" in (shown.capabilities or [])
    with pytest.raises(ollama.ResponseError) as error:
        client.show("no/such-model")
    assert error.value.status_code == 404


def test_ps_lists_the_loaded_models_with_their_keep_alive(client: ollama.Client, node: FakeNode) -> None:
    (loaded,) = client.ps().models
    assert loaded.model == f"{EMBEDDED_MODEL_ID}:latest" and (loaded.size or 0) > 0 and loaded.size_vram == 0
    assert loaded.context_length == node.context_window and loaded.expires_at is None
    client.chat(model=EMBEDDED_MODEL_ID, messages=[{"role": "user", "content": "hi"}], keep_alive="10m")
    (loaded,) = client.ps().models
    assert loaded.expires_at is not None and abs(loaded.expires_at.timestamp() - time.time() - 600) < 30


def test_version_names_the_api_and_ringlet(url: str) -> None:
    version = httpx.get(url + "/api/version").json()
    assert version["version"] and version["ringlet"]


async def pull_and_delete(node: Node) -> dict[str, object]:
    await node.start()
    try:
        transport = httpx.ASGITransport(app=create_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
            pulled = await client.post("/api/pull", json={"model": REPO_ID})
            return {
                "lines": [json.loads(line) for line in pulled.text.splitlines()],
                "stored": ModelStore().get(REPO_ID) is not None,
                "shown": await client.post("/api/show", json={"model": REPO_ID}),
                "bad_name": await client.post("/api/pull", json={"model": "not a repo!"}),
                "deleted": await client.request("DELETE", "/api/delete", json={"model": REPO_ID}),
                "gone": ModelStore().get(REPO_ID) is None,
                "again": await client.request("DELETE", "/api/delete", json={"model": REPO_ID}),
            }
    finally:
        await node.stop()


def test_pull_streams_progress_then_delete_removes_the_model(hub: FakeHub) -> None:
    with ThreadPoolExecutor(1) as pool:  # a loop of its own: another test may hold one on this thread
        seen = pool.submit(lambda: asyncio.run(pull_and_delete(Node(node_info("a", 8))))).result(timeout=120)
    lines = seen["lines"]
    assert isinstance(lines, list) and lines[-1] == {"status": "success"} and seen["stored"]
    assert all(line["status"].startswith("pulling") for line in lines[:-1])
    shown = seen["shown"]  # the catalog does not list it, the store has it: known by its name
    assert isinstance(shown, httpx.Response) and shown.status_code == 200, shown
    assert shown.json()["details"]["family"] == "llama"
    bad, deleted, again = seen["bad_name"], seen["deleted"], seen["again"]
    assert isinstance(bad, httpx.Response) and bad.status_code == 400 and "Hugging Face" in bad.json()["error"]
    assert isinstance(deleted, httpx.Response) and deleted.status_code == 200 and seen["gone"]
    assert isinstance(again, httpx.Response) and again.status_code == 404
