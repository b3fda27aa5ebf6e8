"""tensor_parallel through the API, in process over ASGI against a fake node with three NVIDIA GPUs: placed and
carried in the instance and /state, previewed with each stage's GPUs and link, and refused with a 4xx naming the
reason where it does not apply or does not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from ringlet.master.placement import GIB
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.engine_info import GpuInfo
from tests.support.fake_node import FakeNode, call_api
from tests.support.node_infos import node_info


def gpu_node(tmp_path: Path) -> FakeNode:
    gpus = tuple(GpuInfo(vendor="nvidia", index=i, name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 * GIB,
                         nvlink=True) for i in range(3))
    return FakeNode(tmp_path, info=node_info("node-h100", 64, engines=("cuda", "cpu"), gpus=gpus, name="h100-box"))


def create(node: FakeNode, **body: Any) -> httpx.Response:
    return call_api(node, "POST", "/instance", json={"model": EMBEDDED_MODEL_ID, "instance_type": "CudaRing", **body})


def test_a_cuda_ring_split_over_three_gpus_is_placed_and_carried(tmp_path: Path) -> None:
    node = gpu_node(tmp_path)
    reply = create(node, tensor_parallel=3)  # the embedded model: 9 attention heads, 3 key/value heads
    assert reply.status_code == 201, reply.text
    instance = reply.json()["instance"]
    assert instance["tensor_parallel"] == 3
    assert call_api(node, "GET", "/state").json()["instances"][instance["instance_id"]]["instance"]["tensor_parallel"] == 3
    previews = call_api(node, "GET", "/instance/previews",
                    params={"model": EMBEDDED_MODEL_ID, "tensor_parallel": 3}).json()["previews"]
    (stage,) = next(p for p in previews if p["instance_type"] == "CudaRing")["stages"]
    assert (stage["tensor_parallel"], stage["link"], stage["weight_format"]) == (3, "NVLink", "bfloat16")


def test_what_does_not_apply_or_fit_is_a_4xx_with_the_reason(tmp_path: Path) -> None:
    node = gpu_node(tmp_path)
    for body, status, reason in (
            ({"tensor_parallel": 2}, 409, "9 attention heads do not split over 2"),
            ({"tensor_parallel": 4}, 409, "use a degree that divides 9"),
            ({"tensor_parallel": 9}, 409, "over 9 NVIDIA GPUs of its node: h100-box has 3"),
            ({"tensor_parallel": 3, "instance_type": "MixedRing"}, 400, "applies to CudaRing, IpexRing, CpuRing"),
            ({"tensor_parallel": 0}, 400, "tensor_parallel")):
        reply = create(node, **body)
        assert reply.status_code == status, (body, reply.text)
        assert reason in reply.json()["error"]["message"], (body, reply.text)
    bad = call_api(node, "GET", "/instance/previews", params={"model": EMBEDDED_MODEL_ID, "tensor_parallel": 0})
    assert bad.status_code == 400, bad.text
    assert len(node.state.instances) == 1, "only the embedded model's instance"
