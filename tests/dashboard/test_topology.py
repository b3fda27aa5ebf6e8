"""Topology and the instance-type choice: what the node reports is what the page shows, live."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.support.dashboard import DashboardPage
from tests.support.intel_node import (
    INTEL_GPU_NAME,
    INTEL_NODE_ID,
    INTEL_NODE_NAME,
    IPEX_VERSION,
    add_intel_node,
    remove_intel_node,
)

JOIN_LEAVE_S = 2  # a node joining or leaving shows within this
ENGINE_LABEL = {"mlx": "MLX", "ipex": "Intel IPEX", "cuda": "CUDA", "cpu": "CPU"}


def test_topology_shows_the_node_and_its_hardware(dashboard: DashboardPage) -> None:
    node_info = next(iter(dashboard.node.json("/state")["nodes"].values()))
    dashboard.open("topology")
    page = dashboard.page

    card = page.locator(f"[data-testid=node-card][data-node-id={node_info['node_id']}]")
    expect(card).to_be_visible()
    expect(card.get_by_role("heading", name=dashboard.node.name)).to_be_visible()
    expect(card.get_by_test_id("cpu")).to_contain_text(node_info["hardware"]["cpu"]["model"])
    expect(card.get_by_test_id("cpu")).to_contain_text(f"{node_info['hardware']['cpu']['logical_cores']} threads")
    expect(card.get_by_test_id("intel-gpu")).to_have_text("none")
    expect(card.get_by_test_id("ipex-version")).to_contain_text("not installed")
    expect(page.get_by_test_id("graph-node")).to_have_count(1)
    expect(page.get_by_test_id("node-count")).to_have_text("1")

    engines = card.get_by_test_id("engines")
    expect(engines.locator("[data-engine=cpu]")).to_contain_text("available")
    ipex_reason = node_info["engines"]["reasons"]["ipex"]
    expect(engines.locator("[data-engine=ipex]")).to_contain_text(ipex_reason["reason"])
    expect(engines.locator("[data-engine=ipex]")).to_contain_text(ipex_reason["fix"])
    selected = node_info["engines"]["selected_engine"]
    expect(card).to_contain_text(f"selected: {ENGINE_LABEL[selected]}")

    dashboard.screenshot("topology")
    dashboard.watch.assert_clean()


def test_intel_ipex_disabled_with_reason_until_a_node_has_an_intel_gpu(dashboard: DashboardPage) -> None:
    page = dashboard.page
    dashboard.open("instances")
    ipex = page.get_by_test_id("instance-type-IpexRing")
    expect(ipex).to_contain_text("Intel IPEX")
    expect(ipex).to_be_disabled()
    expect(page.get_by_test_id("instance-type-reason-IpexRing")).to_have_text("no node has an Intel GPU")
    expect(page.get_by_test_id("instance-type-CpuRing")).to_be_enabled()
    # a mixed ring runs each stage on its node's own engine: possible wherever a node has one
    expect(page.get_by_test_id("instance-type-MixedRing")).to_be_enabled()
    expect(page.get_by_test_id("instance-type-reason-MixedRing")).to_have_text("each node's own engine · gloo")
    # MLX runs on this Linux CPU (mlx-cpu) and reads the GGUF file; Jaccl needs Macs, which nothing here is
    expect(page.get_by_test_id("instance-type-MlxRing")).to_be_enabled()
    expect(page.get_by_test_id("instance-type-reason-MlxJaccl")).to_have_text(
        "MLX Jaccl needs Macs (RDMA over Thunderbolt); no node runs macOS")
    expect(page.get_by_test_id("instance-type-reason-CudaRing")).to_have_text("no node has an NVIDIA GPU")
    dashboard.screenshot("instances-no-intel-gpu")

    add_intel_node(page)  # the next poll of /state lists a node with an Intel Arc card
    expect(ipex).to_be_enabled(timeout=JOIN_LEAVE_S * 1000)
    ipex.click()
    expect(ipex).to_have_attribute("aria-checked", "true")
    expect(page.get_by_test_id("launch")).to_have_text("Launch IpexRing")

    dashboard.show("topology")
    expect(page.get_by_test_id("graph-node")).to_have_count(2)
    intel_card = page.locator(f"[data-testid=node-card][data-node-id={INTEL_NODE_ID}]")
    expect(intel_card.get_by_role("heading", name=INTEL_NODE_NAME)).to_be_visible()
    expect(intel_card.get_by_test_id("intel-gpu")).to_contain_text(f"1 × {INTEL_GPU_NAME}")
    expect(intel_card.get_by_test_id("intel-gpu")).to_contain_text("16.0 GiB")
    expect(intel_card.get_by_test_id("ipex-version")).to_have_text(IPEX_VERSION)
    expect(intel_card).to_contain_text("selected: Intel IPEX")
    expect(page.get_by_test_id("activity")).to_contain_text(f"{INTEL_NODE_NAME} joined")
    dashboard.screenshot("topology-with-intel-node")

    remove_intel_node(page)  # the node leaves: gone from the graph, and IPEX impossible again
    expect(page.get_by_test_id("graph-node")).to_have_count(1, timeout=JOIN_LEAVE_S * 1000)
    expect(page.get_by_test_id("activity")).to_contain_text(f"{INTEL_NODE_NAME} left")
    dashboard.show("instances")
    expect(ipex).to_be_disabled()
    expect(ipex).to_have_attribute("aria-checked", "false")
    expect(page.get_by_test_id("launch")).to_have_text(re.compile(r"Launch (?!IpexRing)"))
    dashboard.watch.assert_clean()
