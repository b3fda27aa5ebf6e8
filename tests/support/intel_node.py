"""A node with an Intel GPU, for the one thing these machines cannot show: the dashboard's answer to one.

The page receives it through Playwright's request routing (`/state` rewritten on its way to the browser),
so the product has no test-only switch. The node copies a real node's report and changes only what an
Intel Arc card changes: its GPU list, the ipex engine and its selection.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from playwright.sync_api import Page, Route

INTEL_NODE_ID = "node-intelarc0001"
INTEL_NODE_NAME = "arc-box"
INTEL_GPU_NAME = "Intel(R) Arc(TM) A770 Graphics"
INTEL_GPU_MEMORY = 16 * 1024**3
IPEX_VERSION = "2.8.10+xpu"


def intel_node_from(real: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(real)
    node["node_id"] = INTEL_NODE_ID
    node["name"] = INTEL_NODE_NAME
    node["hardware"]["gpus"] = [{"vendor": "intel", "index": 0, "name": INTEL_GPU_NAME,
                                 "memory_total_bytes": INTEL_GPU_MEMORY, "memory_free_bytes": INTEL_GPU_MEMORY,
                                 "driver": "i915"}]
    engines = node["engines"]
    engines["available_engines"] = ["ipex", "cpu"]
    engines["selected_engine"] = "ipex"
    engines.update(ipex_available=True, mlx_available=False, intel_gpu_count=1, intel_gpu_memory=INTEL_GPU_MEMORY,
                   ipex_version=IPEX_VERSION)
    engines["reasons"] = {k: v for k, v in engines["reasons"].items() if k != "ipex"}
    engines["reasons"]["mlx"] = {"reason": "mlx is not installed", "fix": "pip install mlx (Apple Silicon)"}
    engines["notes"] = {}
    return node


def add_intel_node(page: Page) -> None:
    """From now on every /state the page fetches also lists the Intel GPU node."""

    def rewrite(route: Route) -> None:
        response = route.fetch()
        state = response.json()
        real = next(iter(state["nodes"].values()))
        state["nodes"][INTEL_NODE_ID] = intel_node_from(real)
        state["links"].append({"source": real["node_id"], "target": INTEL_NODE_ID, "latency_ms": 0.4})
        route.fulfill(response=response, body=json.dumps(state), content_type="application/json")

    page.route("**/state", rewrite)


def remove_intel_node(page: Page) -> None:
    page.unroute("**/state")
