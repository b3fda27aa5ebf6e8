"""The cluster endpoints (node id, state with the tasks in flight, topology, engines, catalog, previews, instances),
body limits, metrics and the OpenAPI schema, over HTTP against a fake node."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Generator, Iterator

import httpx

from ringlet.api.app import create_app
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.messages import BatchStats
from ringlet.worker.supervisor import InstanceLoad
from tests.support.fake_node import RUNNER_PID, FakeNode
from tests.support.processes import wait_until


def test_node_id_state_and_topology_agree(url: str, node: FakeNode) -> None:
    assert httpx.get(url + "/node_id").json() == {"node_id": node.node_id, "name": "fake-node"}
    state = httpx.get(url + "/state").json()
    assert list(state["nodes"]) == [node.node_id] and state["tasks"] == {} and state["links"] == []
    described = state["nodes"][node.node_id]
    assert described["engines"]["selected_engine"] == "cpu" and described["memory"]["available_bytes"] > 0
    (record,) = [r for r in state["instances"].values() if r["instance"]["model"] == EMBEDDED_MODEL_ID]
    assert record["status"] == "ready" and record["instance"]["instance_type"] == "CpuRing"
    assert record["progress"] == 1.0 and record["error"] is None
    runner = record["runners"][node.node_id]
    assert runner["context_length"] == node.context_window and runner["pid"] == RUNNER_PID
    assert state["last_event"] == node.state.last_event > 0
    topology = httpx.get(url + "/topology").json()
    assert [n["node_id"] for n in topology["nodes"]] == [node.node_id] and topology["links"] == []
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["node_id"] == node.node_id
    assert (health["instances_ready"], health["instances_loading"], health["instances_failed"]) == (1, 0, 0)


def _streaming(url: str) -> Generator[str, None, None]:
    body = {"model": EMBEDDED_MODEL_ID, "messages": [{"role": "user", "content": "Tell a story."}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as reply:
        yield from reply.iter_lines()


def test_state_and_metrics_show_the_tasks_in_flight(url: str, node: FakeNode) -> None:
    node.script, node.token_delay_s = lambda: itertools.repeat(" and then"), 0.005
    stream = _streaming(url)
    assert next(stream).startswith("data: ")
    (instance_id,) = node.state.instances
    tasks = httpx.get(url + "/state").json()["tasks"]
    ((task_id, task),) = tasks.items()
    assert task == {"task_id": task_id, "instance_id": instance_id, "model": EMBEDDED_MODEL_ID,
                    "origin_node_id": node.node_id, "status": "running", "submitted_at": task["submitted_at"]}
    metrics = httpx.get(url + "/metrics").text
    assert f'ringlet_tasks{{instance_id="{instance_id}",model="{EMBEDDED_MODEL_ID}",status="running"}} 1.0' in metrics
    stream.close()
    wait_until(lambda: httpx.get(url + "/state").json()["tasks"] == {}, 5, "the task gone once its client left")


def test_engines_explain_the_missing_ones(url: str) -> None:
    engines = httpx.get(url + "/engines").json()
    assert engines["available_engines"] == ["cpu"] and engines["selected_engine"] == "cpu"
    assert engines["reasons"]["ipex"]["reason"] and engines["reasons"]["ipex"]["fix"], "a missing engine says why"


def test_models_catalog_says_what_fits(url: str, node: FakeNode) -> None:
    models = {m["card"]["id"]: m for m in httpx.get(url + "/models").json()["models"]}
    embedded = models[EMBEDDED_MODEL_ID]
    assert embedded["on_disk"] and embedded["instance_ids"] == list(node.state.instances)
    fits = {f["instance_type"]: f for f in embedded["fits"]}
    assert fits["CpuRing"]["possible"] and fits["CpuRing"]["reason"] is None
    assert not fits["IpexRing"]["possible"] and "Intel GPU" in fits["IpexRing"]["reason"]
    assert models["Qwen/Qwen3-0.6B"]["instance_ids"] == []


def test_previews_show_the_split_or_why_not(url: str) -> None:
    body = httpx.get(url + "/instance/previews", params={"model": "smollm2-135m"}).json()
    assert body["model"] == body["card"]["id"] == EMBEDDED_MODEL_ID
    previews = {p["instance_type"]: p for p in body["previews"]}
    (stage,) = previews["CpuRing"]["stages"]
    assert (stage["start"], stage["end"]) == (0, 30) and 0 < stage["memory_bytes"] < stage["usable_bytes"]
    assert previews["IpexRing"]["reason"].startswith("IpexRing needs a node with an Intel GPU; none of the 1 node")
    missing = httpx.get(url + "/instance/previews", params={"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(url + "/instance/previews", params={"model": EMBEDDED_MODEL_ID, "min_nodes": 0}).status_code == 400


def test_instances_are_created_read_and_deleted(url: str, node: FakeNode) -> None:
    created = httpx.post(url + "/instance", json={"model": "Qwen/Qwen3-0.6B", "nodes": ["fake-node"]})
    assert created.status_code == 201, created.text
    record = created.json()
    instance_id = record["instance"]["instance_id"]
    assert record["status"] == "loading" and record["instance"]["instance_type"] == "CpuRing"
    assert [s["node_id"] for s in record["instance"]["shards"]] == [node.node_id], "a node named by its name"
    assert httpx.get(f"{url}/instance/{instance_id}").json()["instance"] == record["instance"]
    assert httpx.get(url + "/health").json()["instances_loading"] == 1
    deleted = httpx.delete(f"{url}/instance/{instance_id}")
    assert deleted.status_code == 200 and deleted.json() == {"instance_id": instance_id, "deleted": True}
    gone = httpx.get(f"{url}/instance/{instance_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "instance_not_found"
    assert instance_id not in httpx.get(url + "/state").json()["instances"]


def test_instance_refusals(url: str) -> None:
    refused = httpx.post(url + "/instance", json={"model": EMBEDDED_MODEL_ID, "instance_type": "IpexRing"})
    assert refused.status_code == 409 and "Intel GPU" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "placement_impossible"
    too_big = httpx.post(url + "/instance", json={"model": "Qwen/Qwen3-8B", "instance_type": "CpuRing",
                                                  "nodes": ["nowhere"]})
    assert too_big.status_code == 409 and "unknown node" in too_big.json()["error"]["message"]
    bad_type = httpx.post(url + "/instance", json={"model": EMBEDDED_MODEL_ID, "instance_type": "GpuMagic"})
    assert bad_type.status_code == 400 and bad_type.json()["error"]["param"] == "instance_type"
    unknown = httpx.post(url + "/instance", json={"model": "no-such-model"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    missing = httpx.get(url + "/instance/inst-missing")
    assert missing.status_code == 404 and "inst-missing" in missing.json()["error"]["message"]
    assert httpx.delete(url + "/instance/inst-missing").status_code == 404


def test_bodies_over_the_limit_are_refused(url: str, node: FakeNode) -> None:
    huge = {"model": EMBEDDED_MODEL_ID, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    declared = httpx.post(url + "/v1/chat/completions", json=huge, timeout=30)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    chunked = httpx.post(url + "/api/chat", content=chunks(), timeout=30)
    assert chunked.status_code == 413 and "request body over" in chunked.json()["error"]
    assert node.submitted == []

    async def length_not_a_number() -> httpx.Response:  # over ASGI: HTTP clients and servers refuse to pass it on
        transport = httpx.ASGITransport(app=create_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.post("/v1/completions", content=b"{}", headers={"Content-Length": "many"})

    bad_length = asyncio.run(length_not_a_number())
    assert bad_length.status_code == 400 and "Content-Length" in bad_length.json()["error"]["message"]


def test_metrics_count_requests_tokens_and_time_to_first_token(url: str) -> None:
    reply = httpx.post(url + "/v1/completions", json={"model": EMBEDDED_MODEL_ID, "prompt": "Hello", "max_tokens": 2})
    assert reply.status_code == 200
    assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "Hello"}).status_code == 404
    assert httpx.post(url + "/api/chat", json={"model": "nope", "messages": [{"role": "user"}]}).status_code == 404
    text = httpx.get(url + "/metrics").text
    assert 'ringlet_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    assert 'ringlet_http_requests_total{method="POST",route="/api/chat",status="404"}' in text
    assert "ringlet_completion_tokens_total{" in text and "ringlet_time_to_first_token_seconds_bucket{" in text
    assert "ringlet_decode_tokens_per_second_bucket{" in text and "ringlet_nodes 1.0" in text
    assert 'ringlet_instances{status="ready"} 1.0' in text
    assert 'ringlet_errors_total{api="openai",kind="model_not_found"}' in text
    assert 'ringlet_errors_total{api="ollama",kind="model_not_found"}' in text


def test_metrics_show_each_runners_batch_queue_and_kv_cache(url: str, node: FakeNode) -> None:
    instance_id = next(iter(node.state.instances))
    node.loads = {instance_id: InstanceLoad(queued=3, batch=BatchStats(
        running=5, waiting=1, step_tokens=133, kv_blocks_used=40, kv_blocks=512, preemptions=2))}
    try:
        text = httpx.get(url + "/metrics").text
    finally:
        node.loads = {}
    labels = f'{{instance_id="{instance_id}",model="{EMBEDDED_MODEL_ID}"}}'
    for line in (f"ringlet_requests_queued{labels} 3.0", f"ringlet_batch_running{labels} 5.0",
                 f"ringlet_batch_waiting{labels} 1.0", f"ringlet_batch_step_tokens{labels} 133.0",
                 f"ringlet_kv_cache_blocks_used{labels} 40.0", f"ringlet_kv_cache_blocks{labels} 512.0",
                 f"ringlet_preemptions_total{labels} 2.0"):
        assert line in text, line


def test_openapi_is_complete(url: str) -> None:
    schema = httpx.get(url + "/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/api/chat", "/api/generate", "/api/tags",
                 "/api/version", "/node_id", "/state", "/topology", "/engines", "/models", "/instance/previews",
                 "/instance", "/instance/{instance_id}", "/health", "/metrics", "/models/download"):
        assert path in paths, path
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], f"{method} {path} documents FastAPI's 422"
            ok = next((operation["responses"][c] for c in ("200", "201", "202") if c in operation["responses"]), None)
            assert ok and ok.get("content"), f"{method} {path} has no documented response body"
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "404", "413", "503"} <= set(chat) and "text/event-stream" in chat["200"]["content"]
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    ollama_chat = paths["/api/chat"]["post"]["responses"]
    assert ollama_chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaError")
    assert "application/x-ndjson" in ollama_chat["200"]["content"]
