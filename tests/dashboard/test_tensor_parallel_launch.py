"""A CudaRing launched from the dashboard with each stage split over two NVIDIA GPUs of its node: the degree reaches
the preview request and the POSTed request, the preview names the stage's GPUs and their link, and the instance card
says it is tensor parallel; other instance types neither show the choice nor send it.

The NVIDIA node, its CudaRing preview and the created instance exist only on their way to the browser (Playwright's
request routing), as in `tests/support/intel_node.py`: these machines have no NVIDIA GPU."""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from playwright.sync_api import Route, expect

from tests.support.dashboard import DashboardPage

GIB = 1024**3
CUDA_NODE_ID = "node-h100pair0001"
CUDA_NODE_NAME = "h100-box"
INSTANCE_ID = "inst-tpdash0001"


def cuda_node_from(real: dict[str, Any]) -> dict[str, Any]:
    """The real node's report with what two NVLinked H100s change: its GPU list and the cuda engine."""
    node = copy.deepcopy(real)
    node["node_id"] = CUDA_NODE_ID
    node["name"] = CUDA_NODE_NAME
    node["hardware"]["gpus"] = [
        {"vendor": "nvidia", "index": i, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * GIB,
         "memory_free_bytes": 79 * GIB, "driver": "550.54.15", "integrated": False, "level_zero_version": None,
         "nvlink": True} for i in range(2)]
    engines = node["engines"]
    engines["available_engines"] = ["cuda", "cpu"]
    engines["selected_engine"] = "cuda"
    engines.update(cuda_available=True, mlx_available=False)
    engines["reasons"] = {k: v for k, v in engines["reasons"].items() if k != "cuda"}
    engines["notes"] = {}
    return node


class CudaCluster:
    """What the page is told: the real node's answers plus the NVIDIA node, and the instance the page created."""

    def __init__(self) -> None:
        self.previews: list[dict[str, list[str]]] = []
        self.created: list[dict[str, Any]] = []

    @classmethod
    def serving(cls, dashboard: DashboardPage) -> CudaCluster:
        cluster, page = cls(), dashboard.page
        page.route("**/state", cluster.state)
        page.route("**/instance/previews**", cluster.preview)
        page.route("**/instance", cluster.create)
        dashboard.open("instances")
        return cluster

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        shard = {"node_id": CUDA_NODE_ID, "rank": 0, "start": 0, "end": 30, "num_layers": 30, "engine": "cuda"}
        runner = {"node_id": CUDA_NODE_ID, "status": "ready", "progress": 1.0, "detail": "ready", "error": None,
                  "pid": 4343, "context_length": 8192, "engine": "cuda", "optimization": None, "fallback": None}
        return {"instance": {"instance_id": INSTANCE_ID, "model": body["model"], "instance_type": "CudaRing",
                             "shards": [shard], "intel_gpu_devices": None, "ipex_optimization_level": "auto",
                             "tensor_parallel": body.get("tensor_parallel", 1)},
                "runners": {CUDA_NODE_ID: runner}, "memory_bytes": {CUDA_NODE_ID: 300 * 1024**2},
                "created_at": 1_700_000_000.0, "ring": None, "status": "ready", "progress": 1.0, "load": None,
                "error": None}

    def state(self, route: Route) -> None:
        response = route.fetch()
        state = response.json()
        real = next(iter(state["nodes"].values()))
        state["nodes"][CUDA_NODE_ID] = cuda_node_from(real)
        state["links"].append({"source": real["node_id"], "target": CUDA_NODE_ID, "latency_ms": 0.4})
        for body in self.created:
            state["instances"][INSTANCE_ID] = self.record(body)
        route.fulfill(response=response, body=json.dumps(state), content_type="application/json")

    def preview(self, route: Route) -> None:
        url = urlsplit(route.request.url)
        query = parse_qs(url.query)
        self.previews.append(query)
        degree = int(query.get("tensor_parallel", ["1"])[0])
        # the real node places for its own hardware only: it is asked without the split, which is added here
        unsplit = {k: v for k, v in query.items() if k != "tensor_parallel"}
        response = route.fetch(url=url._replace(query=urlencode(unsplit, doseq=True)).geturl())
        answer = response.json()
        stage = {"node_id": CUDA_NODE_ID, "node_name": CUDA_NODE_NAME, "engine": "cuda", "start": 0,
                 "end": answer["card"]["num_layers"], "memory_bytes": 300 * 1024**2, "weight_bytes": 270 * 1024**2,
                 "kv_bytes": 30 * 1024**2, "weight_format": "bfloat16", "usable_bytes": degree * 70 * GIB,
                 "device": None, "devices": [], "tensor_parallel": degree, "link": "NVLink" if degree > 1 else None}
        answer["previews"] = [{"instance_type": "CudaRing", "possible": True, "reason": None, "stages": [stage]}
                              if p["instance_type"] == "CudaRing" else p for p in answer["previews"]]
        route.fulfill(response=response, body=json.dumps(answer), content_type="application/json")

    def create(self, route: Route) -> None:
        if route.request.method != "POST":
            route.fallback()
            return
        body = route.request.post_data_json
        assert body is not None, "POST /instance without a body"
        self.created.append(body)
        route.fulfill(status=201, body=json.dumps(self.record(body)), content_type="application/json")


def test_launch_a_cuda_ring_split_over_two_gpus_of_its_node(dashboard: DashboardPage) -> None:
    page, cluster = dashboard.page, CudaCluster.serving(dashboard)
    degree = page.get_by_test_id("tensor-parallel")

    cuda = page.get_by_test_id("instance-type-CudaRing")
    expect(cuda).to_be_enabled()
    cuda.click()
    expect(degree).to_be_visible()
    expect(degree).to_have_value("1")
    expect(page.get_by_test_id("placement-stage")).to_contain_text(CUDA_NODE_NAME)
    expect(page.get_by_test_id("placement-tensor-parallel")).to_have_count(0)
    assert all("tensor_parallel" not in q for q in cluster.previews), "a degree of 1 is the API's default"

    degree.fill("2")
    expect(page.get_by_test_id("placement-tensor-parallel")).to_have_text(" · 2 GPUs · NVLink")
    assert cluster.previews[-1]["tensor_parallel"] == ["2"]
    dashboard.screenshot("instances-tensor-parallel")

    # the degree belongs to CudaRing and CpuRing: another type neither shows it nor asks its preview with it
    mixed = page.get_by_test_id("instance-type-MixedRing")
    expect(mixed).to_be_enabled()
    with page.expect_request("**/instance/previews**") as asked:
        mixed.click()
    expect(degree).to_have_count(0)
    assert "tensor_parallel" not in parse_qs(urlsplit(asked.value.url).query)

    cuda.click()
    expect(degree).to_have_value("2")
    expect(page.get_by_test_id("placement-tensor-parallel")).to_have_text(" · 2 GPUs · NVLink")
    launch = page.get_by_test_id("launch")
    expect(launch).to_have_text("Launch CudaRing")
    expect(launch).to_be_enabled()
    launch.click()
    card = page.locator(f"[data-testid=instance-card][data-instance-id={INSTANCE_ID}]")
    expect(card).to_be_visible()
    (body,) = cluster.created
    assert (body["instance_type"], body["min_nodes"], body["tensor_parallel"]) == ("CudaRing", 1, 2)
    expect(card.get_by_test_id("instance-tensor-parallel")).to_have_text("tensor parallel 2")
    dashboard.screenshot("instance-tensor-parallel")
    page.unroute("**/state")
    dashboard.watch.assert_clean()
