"""A request that names a model by its path on the node (Ollama's load on use): a file or folder in the node's model
folders that is no model is a 400 saying why, and one outside them a 404 saying they are the only places it serves
from; one that does not exist is a 404 saying so. In process over ASGI: the node is not started, so nothing loads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from ringlet.api.app import create_app
from ringlet.models.names import Catalog
from ringlet.node import Node
from ringlet.shared.state import NodeJoined
from tests.support.node_infos import node_info


def chat(node: Node, model: str) -> httpx.Response:
    node.apply_ordered(NodeJoined(node=node.info))
    app = create_app(node)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            return await client.post("/api/chat", json={"model": model, "stream": False,
                                                        "messages": [{"role": "user", "content": "hi"}]})

    return asyncio.run(call())


def test_a_path_in_the_model_folders_that_is_no_model_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "broken.gguf").write_bytes(b"not a GGUF file at all")
    reply = chat(Node(node_info("a", 8), catalog=Catalog(local_roots=[folder])), str(folder / "broken.gguf"))
    assert reply.status_code == 400, reply.text
    assert "is not a model this node can load" in reply.json()["error"]


def test_a_path_outside_the_model_folders_is_not_served(tmp_path: Path) -> None:
    folder, elsewhere = tmp_path / "models", tmp_path / "elsewhere.gguf"
    folder.mkdir()
    elsewhere.write_bytes(b"whatever it holds")
    reply = chat(Node(node_info("a", 8), catalog=Catalog(local_roots=[folder])), str(elsewhere))
    assert reply.status_code == 404, reply.text
    assert f"it is a path outside this node's model folders ({folder})" in reply.json()["error"]


def test_a_path_that_does_not_exist_is_not_found_saying_so(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    reply = chat(Node(node_info("a", 8), catalog=Catalog(local_roots=[folder])), str(folder / "missing.gguf"))
    assert reply.status_code == 404, reply.text
    assert "no such file or folder" in reply.json()["error"]
