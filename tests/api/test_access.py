"""Who may call the API: a key where one is set (401 without it, on every endpoint but /health and the dashboard's
files), the Host header naming this node (403 for DNS rebinding), and no state change from another site's page (403
for a foreign Origin, a cross-site text/plain POST included). Over real HTTP on loopback, through the official
openai client and the CLI's client too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from fastapi.routing import APIRoute

from ringlet.api import anthropic as anthropic_routes
from ringlet.api import cluster, downloads, metrics, ollama, responses
from ringlet.api import openai as openai_routes
from ringlet.api.app import create_app
from ringlet.api.security import Access, host_name, keys_from
from ringlet.cli.client import NodeApiError, NodeClient
from tests.support.fake_node import FakeNode, serving

KEY, OTHER_KEY = "sk-ringlet-test-key", "second-key"
CHAT = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node wanting one of two keys, answering to its own names and chat.example.org's pages."""
    node = FakeNode(tmp_path_factory.mktemp("store"))
    dashboard = tmp_path_factory.mktemp("build")
    (dashboard / "index.html").write_text("<html>dashboard</html>")
    (dashboard / "app.js").write_text("console.log(1)")
    access = Access((KEY, OTHER_KEY), frozenset({"localhost", "127.0.0.1"}), frozenset({"https://chat.example.org"}))
    try:
        with serving(create_app(node, dashboard_dir=dashboard, access=access)) as url:
            yield url
    finally:
        node.downloads.close()


def routes() -> list[tuple[str, str]]:
    """(method, path) of every API route, path parameters filled in."""
    found = []
    for router in (openai_routes.router, responses.router, anthropic_routes.router, ollama.router, cluster.router,
                   downloads.router, metrics.router):
        for route in router.routes:
            assert isinstance(route, APIRoute)
            for method in sorted(route.methods):
                found.append((method, route.path.replace("{instance_id}", "x").replace("{download_id}", "x")))
    return found


def test_without_the_key_every_endpoint_but_health_is_401(keyed: str) -> None:
    checked = 0
    for method, path in routes():
        reply = httpx.request(method, keyed + path, json={} if method in ("POST", "DELETE") else None)
        if path == "/health":
            assert reply.status_code == 200
            continue
        assert reply.status_code == 401, (method, path, reply.status_code)
        assert reply.headers["www-authenticate"].startswith("Bearer")
        body = reply.json()
        message = body["error"] if path.startswith("/api/") else body["error"]["message"]  # Ollama's shape there
        assert "Authorization: Bearer KEY" in message, (path, message)
        checked += 1
    assert checked >= 20


def test_a_wrong_key_is_401_and_either_key_works(keyed: str) -> None:
    wrong = httpx.get(keyed + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "a wrong API key" in wrong.json()["error"]["message"]
    assert httpx.get(keyed + "/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    for key in (KEY, OTHER_KEY):
        assert httpx.get(keyed + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_the_dashboard_files_load_without_the_key(keyed: str) -> None:
    assert httpx.get(keyed + "/").text == "<html>dashboard</html>"
    assert httpx.get(keyed + "/app.js").status_code == 200
    assert httpx.post(keyed + "/app.js").status_code == 401  # only reading the files is open


def test_the_official_clients_and_the_cli_pass_with_the_key(keyed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = openai.OpenAI(base_url=keyed + "/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert answer.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="wrong", max_retries=0).models.list()
    messages = anthropic.Anthropic(base_url=keyed, api_key=KEY, max_retries=0).messages  # the key as x-api-key
    assert messages.create(**CHAT).content  # type: ignore[call-overload]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=keyed, api_key="wrong", max_retries=0).messages.create(**CHAT)  # type: ignore[call-overload]
    monkeypatch.setenv("RINGLET_API_KEY", f" ,{OTHER_KEY}")
    assert NodeClient(keyed).get("/v1/models")["object"] == "list"
    monkeypatch.delenv("RINGLET_API_KEY")
    with pytest.raises(NodeApiError, match="401.*set RINGLET_API_KEY"):
        NodeClient(keyed).get("/v1/models")


def test_a_host_that_is_not_this_node_is_403(keyed: str) -> None:
    """DNS rebinding: evil.example made to resolve to 127.0.0.1; the browser still sends its own name."""
    for method in ("GET", "POST"):
        reply = httpx.request(method, keyed + "/v1/chat/completions", json=CHAT,
                              headers={"Host": "evil.example", "Authorization": f"Bearer {KEY}"})
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "unknown_host"
        assert "--allow-host" in reply.json()["error"]["message"]
    port = keyed.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2"):
        assert httpx.get(keyed + "/health", headers={"Host": host}).status_code == 200, host


def test_another_sites_page_cannot_post_even_text_plain(keyed: str) -> None:
    bearer = {"Authorization": f"Bearer {KEY}"}
    port = keyed.rsplit(":", 1)[1]
    for origin in ("https://evil.example", "null", f"http://localhost:{int(port) + 1}"):
        # a form post or fetch with text/plain is a "simple" request: no preflight, the browser just sends it
        for path in ("/api/chat", "/v1/chat/completions", "/instance"):
            reply = httpx.post(keyed + path, content=b'{"model": "x"}',
                               headers={"Origin": origin, "Content-Type": "text/plain", **bearer})
            assert reply.status_code == 403, (origin, path)
        assert httpx.delete(keyed + "/instance/x", headers={"Origin": origin, **bearer}).status_code == 403
    # reading with a foreign Origin is the browser's business (no CORS headers are sent, so the page cannot read)
    assert httpx.get(keyed + "/v1/models", headers={"Origin": "https://evil.example", **bearer}).status_code == 200
    # the node's own pages and the allowed site may
    for origin in (f"http://127.0.0.1:{port}", "https://chat.example.org"):
        reply = httpx.post(keyed + "/v1/chat/completions", json=CHAT, headers={"Origin": origin, **bearer})
        assert reply.status_code == 200, origin


def test_without_keys_the_api_is_open_but_still_checks_host_and_origin(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    try:
        with serving(create_app(node, dashboard_dir=tmp_path, access=Access())) as url:
            assert httpx.get(url + "/v1/models").status_code == 200
            assert httpx.post(url + "/api/chat", content=b"{}", headers={"Origin": "https://evil.example"}
                              ).status_code == 403
            assert httpx.get(url + "/v1/models", headers={"Host": "attacker.test"}).status_code == 403
    finally:
        node.downloads.close()


def test_keys_and_host_names_are_read_as_written() -> None:
    assert keys_from(["a", " b "], "c, ,a,d") == ("a", "b", "c", "d")
    assert keys_from([], None) == ()
    assert [host_name(h) for h in ("[::1]:52415", "LocalHost:80", "10.0.0.5", "fe80::1")] == [
        "::1", "localhost", "10.0.0.5", "fe80::1"]
