"""The app without a runner (in process, over ASGI): dashboard serving, unknown paths, the OpenAPI schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from ringlet.api.app import create_app
from ringlet.models.names import Catalog
from ringlet.node import Node
from tests.support.node_infos import node_info


def get(app, path: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            return await client.get(path)

    return asyncio.run(call())


def test_dashboard_not_built_page_says_how_to_build_it(tmp_path: Path) -> None:
    app = create_app(Node(node_info("a", 8)), dashboard_dir=tmp_path / "build")
    page = get(app, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "npm ci &amp;&amp; npm run build" in page.text and str(tmp_path / "build") in page.text


def test_built_dashboard_is_served_and_api_paths_still_win(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>dashboard</html>")
    (tmp_path / "app.js").write_text("console.log(1)")
    app = create_app(Node(node_info("a", 8)), dashboard_dir=tmp_path)
    assert get(app, "/").text == "<html>dashboard</html>"
    assert get(app, "/app.js").text == "console.log(1)"
    assert get(app, "/v1/models").json()["object"] == "list"
    missing = get(app, "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert get(app, "/../../etc/passwd").status_code == 404


def test_ollama_errors_have_ollama_shape(tmp_path: Path) -> None:
    app = create_app(Node(node_info("a", 8)), dashboard_dir=tmp_path)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            return await client.post("/api/chat", json={"model": "SmolLM2-135M-Instruct", "messages": []})

    reply = asyncio.run(call())
    assert reply.status_code == 400 and isinstance(reply.json()["error"], str) and "messages" in reply.json()["error"]


def test_model_names_that_are_no_paths_are_not_found(tmp_path: Path) -> None:
    app = create_app(Node(node_info("a", 8)), dashboard_dir=tmp_path)
    for name in ("~%00", "a%00b", "~nosuchuser/model"):  # found by the fuzzer: a NUL byte once gave a 500
        reply = get(app, f"/instance/previews?model={name}")
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found", name
    # a directory the node may load from, holding no model: a bad model; outside those directories: not found
    inside = get(create_app(Node(node_info("a", 8), catalog=Catalog([tmp_path])), dashboard_dir=tmp_path),
                 f"/instance/previews?model={tmp_path}")
    assert inside.status_code == 400 and inside.json()["error"]["param"] == "model"
    outside = get(app, f"/instance/previews?model={tmp_path}")
    assert outside.status_code == 404 and outside.json()["error"]["code"] == "model_not_found"


def test_models_load_by_path_only_from_the_nodes_model_directories(tmp_path: Path,
                                                                   tiny_checkpoint: dict[str, bytes]) -> None:
    model = tmp_path / "models" / "tiny"
    for name, data in tiny_checkpoint.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(data)
    allowed = create_app(Node(node_info("a", 8), catalog=Catalog([tmp_path / "models"])), dashboard_dir=tmp_path)
    assert get(allowed, f"/instance/previews?model={model}").status_code == 200
    elsewhere = create_app(Node(node_info("a", 8), catalog=Catalog([tmp_path / "other"])), dashboard_dir=tmp_path)
    forbidden, missing = (get(elsewhere, f"/instance/previews?model={path}") for path in (model, tmp_path / "nope"))
    assert forbidden.status_code == missing.status_code == 404
    assert forbidden.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    for path in (f"{tmp_path}/models/../models/tiny", f"{tmp_path}/other/../models/tiny"):  # resolved, then checked
        assert get(elsewhere, f"/instance/previews?model={path}").status_code == 404
