"""Cluster management endpoints, limits and metrics of a live single node."""

from __future__ import annotations

import httpx

from tests.support.processes import LiveNode


def test_node_id_state_and_topology_agree(live_node: LiveNode, model_id: str) -> None:
    node_id = live_node.get("/node_id").json()["node_id"]
    state = live_node.get("/state").json()
    assert list(state["nodes"]) == [node_id]
    node = state["nodes"][node_id]
    assert node["engines"]["selected_engine"] == "cpu" and node["memory"]["available_bytes"] > 0
    (record,) = [r for r in state["instances"].values() if r["instance"]["model"] == model_id]
    assert record["status"] == "ready" and record["instance"]["instance_type"] == "CpuRing"
    assert record["runners"][node_id]["context_length"] == 8192 and record["runners"][node_id]["pid"] > 0
    topology = live_node.get("/topology").json()
    assert [n["node_id"] for n in topology["nodes"]] == [node_id] and topology["links"] == []
    health = live_node.get("/health").json()
    assert health["status"] == "ok" and health["instances_ready"] >= 1


def test_engines_explain_the_missing_ones(live_node: LiveNode) -> None:
    engines = live_node.get("/engines").json()
    assert "cpu" in engines["available_engines"]
    assert engines["reasons"]["ipex"]["reason"], "a missing engine says why"


def test_models_catalog_says_what_fits(live_node: LiveNode, model_id: str) -> None:
    models = {m["card"]["id"]: m for m in live_node.get("/models").json()["models"]}
    embedded = models[model_id]
    assert embedded["on_disk"] and embedded["instance_ids"]
    fits = {f["instance_type"]: f for f in embedded["fits"]}
    assert fits["CpuRing"]["possible"] and not fits["IpexRing"]["possible"]
    assert "Intel GPU" in fits["IpexRing"]["reason"]


def test_previews_show_the_split_or_why_not(live_node: LiveNode, model_id: str) -> None:
    body = live_node.get("/instance/previews", params={"model": model_id}).json()
    previews = {p["instance_type"]: p for p in body["previews"]}
    (stage,) = previews["CpuRing"]["stages"]
    assert (stage["start"], stage["end"]) == (0, 30) and stage["memory_bytes"] > 0
    assert previews["IpexRing"]["reason"].startswith("IpexRing needs a node with an Intel GPU; none of the 1 node")
    assert live_node.get("/instance/previews", params={"model": "nope"}).status_code == 404


def test_instance_refusals(live_node: LiveNode, model_id: str) -> None:
    refused = live_node.post("/instance", json={"model": model_id, "instance_type": "IpexRing"})
    assert refused.status_code == 409 and "Intel GPU" in refused.json()["error"]["message"]
    too_big = live_node.post("/instance", json={"model": "Qwen/Qwen3-8B", "instance_type": "CpuRing",
                                                "nodes": ["nowhere"]})
    assert too_big.status_code == 409 and "unknown node" in too_big.json()["error"]["message"]
    bad_type = live_node.post("/instance", json={"model": model_id, "instance_type": "GpuMagic"})
    assert bad_type.status_code == 400 and bad_type.json()["error"]["param"] == "instance_type"
    assert live_node.get("/instance/inst-missing").status_code == 404
    assert httpx.delete(live_node.url + "/instance/inst-missing").status_code == 404


def test_bodies_over_the_limit_are_refused(live_node: LiveNode, model_id: str) -> None:
    huge = {"model": model_id, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    declared = live_node.post("/v1/chat/completions", json=huge)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: counted while read
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    chunked = httpx.post(live_node.url + "/api/chat", content=chunks(), timeout=60)
    assert chunked.status_code == 413 and "request body over" in chunked.json()["error"]


def test_metrics_count_requests_tokens_and_time_to_first_token(live_node: LiveNode, model_id: str) -> None:
    reply = live_node.post("/v1/completions", json={"model": model_id, "prompt": "Hello", "max_tokens": 2})
    assert reply.status_code == 200
    assert live_node.post("/v1/completions", json={"model": "nope", "prompt": "Hello"}).status_code == 404
    text = live_node.get("/metrics").text
    assert 'ringlet_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    assert "ringlet_completion_tokens_total{" in text and "ringlet_time_to_first_token_seconds_bucket{" in text
    assert 'ringlet_instances{status="ready"}' in text
    assert 'ringlet_errors_total{api="openai",kind="model_not_found"}' in text


def test_openapi_is_complete(live_node: LiveNode) -> None:
    schema = live_node.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/api/chat", "/api/generate", "/api/tags",
                 "/api/version", "/node_id", "/state", "/topology", "/engines", "/models", "/instance/previews",
                 "/instance", "/instance/{instance_id}", "/health", "/metrics"):
        assert path in paths, path
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], f"{method} {path} documents FastAPI's 422"
            ok = next((operation["responses"][c] for c in ("200", "201", "202") if c in operation["responses"]), None)
            assert ok and ok.get("content"), f"{method} {path} has no documented response body"
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "404", "413", "503"} <= set(chat) and "text/event-stream" in chat["200"]["content"]
