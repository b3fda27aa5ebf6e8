"""Instances of the embedded model on live nodes: create one on given nodes, complete and stream a prompt, delete."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.processes import Cluster, LiveNode, wait_until

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The three primary colours are"


def create(node: LiveNode, cluster: Cluster, node_ids: list[str], instance_type: str = "CpuRing",
           tensor_parallel: int = 1) -> str:
    reply = node.post("/instance", json={"model": MODEL, "instance_type": instance_type, "nodes": node_ids,
                                         "tensor_parallel": tensor_parallel})
    assert reply.status_code == 201, reply.text
    instance_id = reply.json()["instance"]["instance_id"]
    wait_until(lambda: node.get(f"/instance/{instance_id}").json()["status"] != "loading", 180,
               f"instance on {len(node_ids)} node(s) loaded", cluster.logs)
    record = node.get(f"/instance/{instance_id}").json()
    assert record["status"] == "ready", record
    assert [s["node_id"] for s in record["instance"]["shards"]] == node_ids
    return instance_id


def complete(node: LiveNode) -> dict[str, Any]:
    reply = node.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def stream(node: LiveNode, max_tokens: int = 16) -> tuple[str, list[dict[str, Any]]]:
    text, events = "", []
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", node.url + "/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                events.append(event)
                text += "".join(c.get("text", "") for c in event.get("choices", []))
    return text, events


def delete(node: LiveNode, instance_id: str) -> None:
    assert httpx.delete(node.url + f"/instance/{instance_id}", timeout=30).status_code == 200
    wait_until(lambda: instance_id not in node.state()["instances"], 10, f"instance {instance_id} deleted")
