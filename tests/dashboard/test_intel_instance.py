"""An IpexRing launched from the dashboard against a node with two Intel GPUs (one integrated, one discrete): the
device choice and optimisation level reach the preview and the POSTed request; the instance card shows what the
runner applied and its fallback; the node card shows each GPU's memory in use, following /state.

The Intel node, the IpexRing preview and the created instance exist only on their way to the browser (Playwright's
request routing), as in `tests/support/intel_node.py`: nothing here can have an Intel GPU."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Route, expect

from tests.support.dashboard import DashboardPage
from tests.support.intel_node import INTEL_NODE_ID, INTEL_NODE_NAME, intel_node_from

GIB = 1024**3
INSTANCE_ID = "inst-ipexdash0001"
OPTIMIZATION = "torch.compile of 60 MLP and norm layers (native torch.xpu, no IPEX)"
FALLBACK = "ipex -> cpu: the device was lost (UR_RESULT_ERROR_DEVICE_LOST)"
SPLIT = [{"device": 0, "start": 0, "end": 12}, {"device": 1, "start": 12, "end": 30}]


class IntelCluster:
    """What the page is told: the real node's answers plus an Intel node, and the instance the page created."""

    def __init__(self) -> None:
        self.free = {0: 6 * GIB, 1: 12 * GIB}
        self.previews: list[dict[str, list[str]]] = []
        self.created: list[dict[str, Any]] = []
        self.load: dict[str, Any] | None = None  # the runner's load report: the instance is loading

    def node(self, real: dict[str, Any]) -> dict[str, Any]:
        node = intel_node_from(real)
        node["hardware"]["gpus"] = [
            {"vendor": "intel", "index": 0, "name": "Intel(R) Iris(R) Xe Graphics", "memory_total_bytes": 8 * GIB,
             "memory_free_bytes": self.free[0], "driver": "i915", "integrated": True, "level_zero_version": "1.17.6"},
            {"vendor": "intel", "index": 1, "name": "Intel(R) Arc(TM) A770 Graphics", "memory_total_bytes": 16 * GIB,
             "memory_free_bytes": self.free[1], "driver": "xe", "integrated": False, "level_zero_version": "1.17.6"},
        ]
        node["engines"].update(intel_gpu_count=2, intel_gpu_memory=24 * GIB)
        return node

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        shard = {"node_id": INTEL_NODE_ID, "rank": 0, "start": 0, "end": 30, "num_layers": 30, "engine": "ipex",
                 "devices": SPLIT if body.get("intel_gpu_devices") == [0, 1] else []}
        runner = {"node_id": INTEL_NODE_ID, "status": "ready", "progress": 1.0, "detail": "ready", "error": None,
                  "pid": 4242, "context_length": 8192, "engine": "cpu", "optimization": OPTIMIZATION,
                  "fallback": FALLBACK}
        if self.load is not None:
            runner.update(status="loading", progress=0.37, detail="loaded 12/30 layers", load=self.load,
                          optimization=None, fallback=None, engine=None)
        status = runner["status"]
        return {"instance": {"instance_id": INSTANCE_ID, "model": body["model"], "instance_type": "IpexRing",
                             "shards": [shard], "intel_gpu_devices": body.get("intel_gpu_devices"),
                             "ipex_optimization_level": body.get("ipex_optimization_level", "auto")},
                "runners": {INTEL_NODE_ID: runner}, "memory_bytes": {INTEL_NODE_ID: 300 * 1024**2},
                "created_at": 1_700_000_000.0, "ring": None, "status": status, "progress": runner["progress"],
                "load": self.load, "error": None}

    def state(self, route: Route) -> None:
        response = route.fetch()
        state = response.json()
        real = next(iter(state["nodes"].values()))
        state["nodes"][INTEL_NODE_ID] = self.node(real)
        state["links"].append({"source": real["node_id"], "target": INTEL_NODE_ID, "latency_ms": 0.4})
        for body in self.created:
            state["instances"][INSTANCE_ID] = self.record(body)
        route.fulfill(response=response, body=json.dumps(state), content_type="application/json")

    def preview(self, route: Route) -> None:
        query = parse_qs(urlsplit(route.request.url).query)
        self.previews.append(query)
        response = route.fetch()
        answer = response.json()
        devices = [int(d) for d in query.get("intel_gpu_devices", ["1"])]
        stage = {"node_id": INTEL_NODE_ID, "node_name": INTEL_NODE_NAME, "engine": "ipex", "start": 0, "end": 30,
                 "memory_bytes": 300 * 1024**2, "weight_bytes": 200 * 1024**2, "kv_bytes": 100 * 1024**2,
                 "weight_format": "int4/32", "usable_bytes": sum(int(self.free[d] * 0.9) for d in devices),
                 "device": devices[-1], "devices": []}
        if devices == [0, 1]:  # as placement answers for a model larger than either device
            stage.update(device=None, devices=[dict(d, memory_bytes=150 * 1024**2, usable_bytes=int(
                self.free[d["device"]] * 0.9)) for d in SPLIT])
        answer["previews"] = [{"instance_type": "IpexRing", "possible": True, "reason": None, "stages": [stage]}
                              if p["instance_type"] == "IpexRing" else p for p in answer["previews"]]
        route.fulfill(response=response, body=json.dumps(answer), content_type="application/json")

    @classmethod
    def serving(cls, dashboard: DashboardPage) -> IntelCluster:
        """A cluster that answers the page's /state, previews and instance creation, the instances view open."""
        cluster, page = cls(), dashboard.page
        page.route("**/state", cluster.state)
        page.route(re.compile(r".*/instance/previews\?.*"), cluster.preview)
        page.route(re.compile(r".*/instance$"), cluster.create)
        dashboard.open("instances")
        return cluster

    def create(self, route: Route) -> None:
        if route.request.method != "POST":
            route.fallback()
            return
        body = route.request.post_data_json
        self.created.append(body)
        route.fulfill(status=201, body=json.dumps(self.record(body)), content_type="application/json")


def test_launch_an_ipex_ring_on_a_chosen_device_and_see_its_fallback(dashboard: DashboardPage) -> None:
    page, cluster = dashboard.page, IntelCluster.serving(dashboard)

    ipex = page.get_by_test_id("instance-type-IpexRing")
    expect(ipex).to_be_enabled()
    ipex.click()
    options = page.get_by_test_id("intel-options")
    expect(options).to_be_visible()
    expect(page.get_by_test_id("intel-device-0")).to_contain_text("Intel(R) Iris(R) Xe Graphics (integrated, 6.0 GiB free)")
    expect(page.get_by_test_id("intel-device-1")).to_contain_text("Intel(R) Arc(TM) A770 Graphics (discrete, 12.0 GiB free)")
    page.get_by_test_id("intel-device-1").get_by_role("checkbox").check()
    page.get_by_test_id("ipex-optimization-level").select_option("compile")
    expect(page.get_by_test_id("placement-device")).to_have_text(" · GPU 1")
    assert cluster.previews[-1]["intel_gpu_devices"] == ["1"]
    assert cluster.previews[-1]["ipex_optimization_level"] == ["compile"]
    dashboard.screenshot("instances-intel-options")

    launch = page.get_by_test_id("launch")
    expect(launch).to_have_text("Launch IpexRing")
    expect(launch).to_be_enabled()
    launch.click()
    card = page.locator(f"[data-testid=instance-card][data-instance-id={INSTANCE_ID}]")
    expect(card).to_be_visible()
    (body,) = cluster.created
    assert body["instance_type"] == "IpexRing" and body["min_nodes"] == 1
    assert (body["intel_gpu_devices"], body["ipex_optimization_level"]) == ([1], "compile")

    fallback = card.get_by_test_id("instance-fallback")
    expect(fallback).to_have_text(f"⚠ {FALLBACK}")
    assert fallback.evaluate("e => getComputedStyle(e).color") == "rgb(227, 168, 59)", "the warning colour"
    expect(card.get_by_test_id("instance-optimization")).to_have_text(f"optimisation: {OPTIMIZATION}")
    expect(card.get_by_test_id("runner-engine")).to_have_text("cpu")
    expect(card.get_by_test_id("instance-intel")).to_have_text("Intel GPUs 1 · optimisation level compile")
    dashboard.screenshot("instance-ipex-fell-back")

    dashboard.show("topology")
    node_card = page.locator(f"[data-testid=node-card][data-node-id={INTEL_NODE_ID}]")
    arc = node_card.get_by_test_id("gpu-intel-1")
    expect(arc.get_by_test_id("gpu-memory")).to_have_text("4.0 GiB used of 16.0 GiB")
    expect(arc.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "25")
    expect(node_card.get_by_test_id("gpu-intel-0")).to_contain_text("integrated")
    expect(node_card.get_by_test_id("gpu-intel-0")).to_contain_text("Level Zero 1.17.6")
    cluster.free[1] = 4 * GIB  # the next poll of /state: the model took 8 GiB more
    expect(arc.get_by_test_id("gpu-memory")).to_have_text("12.0 GiB used of 16.0 GiB")
    expect(arc.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "75")
    dashboard.screenshot("topology-intel-gpu-memory")
    page.unroute("**/state")
    dashboard.watch.assert_clean()


def test_an_ipex_ring_split_over_two_gpus_shows_each_ones_layers(dashboard: DashboardPage) -> None:
    page, cluster = dashboard.page, IntelCluster.serving(dashboard)
    page.get_by_test_id("instance-type-IpexRing").click()
    page.get_by_test_id("intel-device-0").get_by_role("checkbox").check()
    page.get_by_test_id("intel-device-1").get_by_role("checkbox").check()
    expect(page.get_by_test_id("placement-devices")).to_have_text(" · GPU 0: layers 0–11 · GPU 1: layers 12–29")
    expect(page.get_by_test_id("placement-device")).to_have_count(0)
    assert cluster.previews[-1]["intel_gpu_devices"] == ["0", "1"]
    page.get_by_test_id("launch").click()
    card = page.locator(f"[data-testid=instance-card][data-instance-id={INSTANCE_ID}]")
    expect(card.get_by_test_id("shard-devices")).to_have_text("GPU 0: layers 0–11 · GPU 1: layers 12–29")
    expect(card.get_by_test_id("instance-intel")).to_have_text("Intel GPUs 0, 1 · optimisation level auto")
    page.unroute("**/state")
    dashboard.watch.assert_clean()


def test_a_loading_instance_shows_its_layers_and_bytes_and_the_preview_its_weights_and_cache(
        dashboard: DashboardPage) -> None:
    page, cluster = dashboard.page, IntelCluster.serving(dashboard)
    cluster.load = {"layers_loaded": 12, "layers_total": 30, "bytes_loaded": 450 * 1024**2,
                    "bytes_total": int(1.1 * GIB)}
    page.get_by_test_id("instance-type-IpexRing").click()
    expect(page.get_by_test_id("placement-split")).to_have_text("weights 200.0 MiB (int4/32) · KV cache 100.0 MiB")
    page.get_by_test_id("launch").click()
    card = page.locator(f"[data-testid=instance-card][data-instance-id={INSTANCE_ID}]")
    expect(card.get_by_test_id("instance-load")).to_have_text("12/30 layers · 450.0 MiB of 1.1 GiB")
    runner = card.get_by_test_id("runner-load")
    expect(runner).to_contain_text("12/30 layers · 450.0 MiB of 1.1 GiB")
    expect(runner.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "40")
    page.unroute("**/state")
    dashboard.watch.assert_clean()
