"""The models and debug views against the node's own answers, and every view at phone width."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect

from tests.support.dashboard import PHONE, DashboardPage

VIEWS = ["topology", "instances", "models", "chat", "debug"]


def test_models_view_lists_the_catalog_with_sizes_and_fit(dashboard: DashboardPage) -> None:
    catalog = dashboard.node.json("/models")["models"]
    dashboard.open("models")
    page = dashboard.page
    rows = page.get_by_test_id("model-row")
    expect(rows).to_have_count(len(catalog))

    embedded = next(m for m in catalog if m["card"]["source"] == "embedded")
    row = page.locator(f"[data-testid=model-row][data-model-id='{embedded['card']['id']}']")
    expect(row).to_contain_text("on disk")
    expect(row).to_contain_text("params 135M")
    expect(row).to_contain_text(f"{embedded['card']['num_layers']} layers")
    for fit in embedded["fits"]:
        chip = row.locator(f".fits [data-instance-type={fit['instance_type']}]")
        expect(chip).to_contain_text("✓" if fit["possible"] else "✕")
        expect(chip).to_have_attribute("title", fit["reason"] or "fits the cluster now")

    row.get_by_role("button", name="Launch…").click()  # takes the model to the launch form
    expect(page.get_by_test_id("model-select")).to_have_value(embedded["card"]["id"])
    dashboard.show("models")
    dashboard.screenshot("models")
    dashboard.watch.assert_clean()


def test_debug_view_shows_each_nodes_raw_engine_info(dashboard: DashboardPage) -> None:
    state = dashboard.node.json("/state")
    dashboard.open("debug")
    page = dashboard.page
    for node_id, node in state["nodes"].items():
        section = page.locator(f"[data-testid=debug-node][data-node-id={node_id}]")
        shown = json.loads(section.get_by_test_id("engine-info-json").inner_text())
        assert shown == node["engines"]
        expect(section).to_contain_text(node["engines"]["reasons"]["ipex"]["reason"])
        selected = node["engines"]["selected_engine"]
        expect(section.locator(f"tr[data-engine={selected}]")).to_contain_text("selected")
        expect(section.locator("tr[data-engine=ipex]")).to_contain_text("missing")
    dashboard.screenshot("debug")
    dashboard.watch.assert_clean()


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_fits_a_phone(phone_dashboard: DashboardPage, view: str) -> None:
    phone_dashboard.open(view)
    page = phone_dashboard.page
    page.wait_for_timeout(300)  # let the first state and catalog render
    overflow = page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= PHONE["width"], f"{view} is {overflow} px wide at {PHONE['width']} px: it scrolls sideways"
    phone_dashboard.screenshot(f"phone-{view}")
    phone_dashboard.watch.assert_clean()
