"""An IpexRing's devices and optimisation level through the API: checked, placed, carried in the instance and in
/state, and in the placement previews. In process over ASGI against a fake node with two Intel GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from ringlet.master.placement import GIB
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.engine_info import GpuInfo
from ringlet.shared.state import RunnerFellBack, RunnerReady
from tests.support.fake_node import FakeNode, call_api
from tests.support.node_infos import node_info

OPTIMIZATION = "ipex.optimize (bf16): 211 of 211 linear layers prepacked"


def intel_node(tmp_path: Path) -> FakeNode:
    gpus = (GpuInfo(vendor="intel", index=0, name="Intel(R) Iris(R) Xe", memory_total_bytes=8 * GIB, integrated=True),
            GpuInfo(vendor="intel", index=1, name="Intel(R) Arc(TM) A770", memory_total_bytes=16 * GIB,
                    integrated=False))
    return FakeNode(tmp_path, info=node_info("node-arc", 32, engines=("ipex", "cpu"), gpus=gpus, name="arc-box"))


def create(node: FakeNode, **body: Any) -> httpx.Response:
    return call_api(node, "POST", "/instance", json={"model": EMBEDDED_MODEL_ID, "instance_type": "IpexRing", **body})


def test_the_options_are_placed_carried_and_reported(tmp_path: Path) -> None:
    node = intel_node(tmp_path)
    reply = create(node, intel_gpu_devices=[0], ipex_optimization_level="compile")
    assert reply.status_code == 201, reply.text
    instance = reply.json()["instance"]
    assert (instance["intel_gpu_devices"], instance["ipex_optimization_level"]) == ([0], "compile")
    instance_id = instance["instance_id"]
    node.emit(RunnerReady(instance_id=instance_id, node_id="node-arc", context_length=8192, engine="ipex",
                          optimization=OPTIMIZATION))
    node.emit(RunnerFellBack(instance_id=instance_id, node_id="node-arc", engine="cpu",
                             reason="ipex -> cpu: the device was lost"))
    record = call_api(node, "GET", "/state").json()["instances"][instance_id]
    assert record["instance"]["intel_gpu_devices"] == [0]
    runner = record["runners"]["node-arc"]
    assert (runner["engine"], runner["optimization"], runner["fallback"]) == (
        "cpu", OPTIMIZATION, "ipex -> cpu: the device was lost")
    default = create(node).json()["instance"]
    assert (default["intel_gpu_devices"], default["ipex_optimization_level"]) == (None, "auto")


def test_a_context_window_is_placed_carried_and_checked(tmp_path: Path) -> None:
    node = intel_node(tmp_path)
    reply = create(node, instance_type="CpuRing", max_context=2048)
    assert reply.status_code == 201, reply.text
    instance_id = reply.json()["instance"]["instance_id"]
    assert call_api(node, "GET", "/state").json()["instances"][instance_id]["instance"]["max_context"] == 2048
    previews = call_api(node, "GET", "/instance/previews", params={"model": EMBEDDED_MODEL_ID, "max_context": 2048})
    wide = call_api(node, "GET", "/instance/previews", params={"model": EMBEDDED_MODEL_ID})
    kv = [next(p["stages"][0]["kv_bytes"] for p in r.json()["previews"] if p["instance_type"] == "CpuRing")
          for r in (previews, wide)]
    assert kv[0] * 4 == kv[1], "2048 positions against the default 8192"
    reply = create(node, instance_type="CpuRing", max_context=4)
    assert reply.status_code == 400 and "max_context" in reply.json()["error"]["message"]


def test_a_device_the_node_lacks_is_a_400_naming_its_devices(tmp_path: Path) -> None:
    reply = create(intel_node(tmp_path), intel_gpu_devices=[1, 4])
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_device", "intel_gpu_devices")
    assert error["message"] == ("node arc-box has no Intel GPU 4; its Intel GPUs: 0 (Intel(R) Iris(R) Xe, integrated, "
                                "8.0 GiB free), 1 (Intel(R) Arc(TM) A770, discrete, 16.0 GiB free)")


def test_the_options_on_another_instance_type_are_a_400(tmp_path: Path) -> None:
    node = intel_node(tmp_path)
    for options in ({"intel_gpu_devices": [1]}, {"ipex_optimization_level": "eager"}):
        reply = create(node, instance_type="CpuRing", **options)
        assert reply.status_code == 400, reply.text
        assert "apply to IpexRing instances only, not CpuRing" in reply.json()["error"]["message"]
    for bad in ([1, 1], [-1], []):
        reply = create(node, intel_gpu_devices=bad)
        assert reply.status_code == 400 and "intel_gpu_devices" in reply.json()["error"]["message"], reply.text
    reply = create(node, ipex_optimization_level="fast")
    assert reply.status_code == 400 and "ipex_optimization_level" in reply.json()["error"]["message"]
    assert len(node.state.instances) == 1, "only the embedded model's instance"


def test_previews_place_ipex_ring_on_the_chosen_device(tmp_path: Path) -> None:
    node = intel_node(tmp_path)
    query = {"model": EMBEDDED_MODEL_ID}
    previews = {p["instance_type"]: p for p in call_api(node, "GET", "/instance/previews", params=query).json()["previews"]}
    (stage,) = previews["IpexRing"]["stages"]
    assert stage["device"] == 1, "the discrete GPU by default"
    chosen = call_api(node, "GET", "/instance/previews", params={**query, "intel_gpu_devices": [0]}).json()["previews"]
    assert next(p for p in chosen if p["instance_type"] == "IpexRing")["stages"][0]["device"] == 0
    missing = call_api(node, "GET", "/instance/previews", params={**query, "intel_gpu_devices": [7]}).json()["previews"]
    ipex = next(p for p in missing if p["instance_type"] == "IpexRing")
    assert not ipex["possible"] and ipex["reason"].startswith("node arc-box has no Intel GPU 7; its Intel GPUs: 0 (")
    assert next(p for p in missing if p["instance_type"] == "CpuRing")["possible"]
    bad = call_api(node, "GET", "/instance/previews", params={**query, "intel_gpu_devices": [2, 2]})
    assert bad.status_code == 400 and "distinct" in bad.json()["error"]["message"]


def test_a_model_larger_than_either_gpu_is_split_over_both(tmp_path: Path) -> None:
    # the embedded model needs about 0.43 GiB in bf16 with its 8192-token cache; each GPU has 0.35 GiB free
    gpus = tuple(GpuInfo(vendor="intel", index=i, name="Intel(R) Arc(TM) A310", memory_total_bytes=4 * GIB,
                         memory_free_bytes=int(0.35 * GIB), integrated=False) for i in (0, 1))
    node = FakeNode(tmp_path, info=node_info("node-arc", 32, engines=("ipex", "cpu"), gpus=gpus, name="arc-box"))
    previews = call_api(node, "GET", "/instance/previews", params={"model": EMBEDDED_MODEL_ID}).json()["previews"]
    (stage,) = next(p for p in previews if p["instance_type"] == "IpexRing")["stages"]
    assert [(d["device"], d["start"], d["end"]) for d in stage["devices"]] == [(0, 0, 15), (1, 15, 30)]
    refused = create(node, intel_gpu_devices=[1], max_context=8192)  # given none, one GPU holds a shorter one
    message = refused.json()["error"]["message"]
    assert refused.status_code == 409 and "split over the devices it may use, which have 0.3 GiB usable" in message
    assert "(arc-box: 1 (Intel(R) Arc(TM) A310, discrete, 0.3 GiB free))" in message
    reply = create(node)
    assert reply.status_code == 201, reply.text
    (shard,) = reply.json()["instance"]["shards"]
    assert shard["devices"] == [{"device": 0, "start": 0, "end": 15}, {"device": 1, "start": 15, "end": 30}]
