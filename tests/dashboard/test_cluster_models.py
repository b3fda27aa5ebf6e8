"""Two live nodes in one cluster, each with its own store, both fetching from a local fake hub: the topology view shows
both, and the models page searches the catalog, downloads a model into the page's node or into the other node with
its progress (cancel, resume), shows which node has it on disk, and deletes it there."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect

from tests.support.dashboard import DESKTOP, DashboardPage, open_page
from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.processes import Cluster, LiveNode

# a curated catalog model, served by the fake hub with the tiny checkpoint's files under its name
CATALOG_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
JOIN_S = 30
DOWNLOAD_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def fake_hub(tiny_checkpoint: dict[str, bytes]) -> Iterator[FakeHub]:
    hub = FakeHub(repos={CATALOG_MODEL: HubRepo(dict(tiny_checkpoint))}).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def two_nodes(dashboard_build: None, fake_hub: FakeHub, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[list[LiveNode]]:
    cluster = Cluster(tmp_path_factory.mktemp("dashboard-cluster"),
                      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub.url}, own_homes=True)
    try:
        nodes = cluster.start("alpha", "beta")
        cluster.wait_agreed(2, timeout_s=JOIN_S)
        nodes[0].json("/models")  # the first catalog request imports torch; take that wait here, once
        yield nodes
    finally:
        cluster.close()


@pytest.fixture
def cluster_dashboard(browser: Browser, two_nodes: list[LiveNode]) -> Iterator[DashboardPage[LiveNode]]:
    yield from open_page(browser, two_nodes[0], DESKTOP)


def test_topology_shows_both_nodes_of_a_two_node_cluster(cluster_dashboard: DashboardPage[LiveNode],
                                                         two_nodes: list[LiveNode]) -> None:
    page = cluster_dashboard.page
    cluster_dashboard.open("topology")
    expect(page.get_by_test_id("node-count")).to_have_text("2")
    expect(page.get_by_test_id("graph-node")).to_have_count(2)
    for node in two_nodes:
        card = page.locator(f"[data-testid=node-card][data-node-id={node.node_id}]")
        expect(card.get_by_role("heading", name=node.name)).to_be_visible()
    expect(page.get_by_test_id("graph-node").filter(has_text="alpha")).to_have_count(1)
    expect(page.get_by_test_id("graph-node").filter(has_text="beta")).to_have_count(1)
    cluster_dashboard.screenshot("topology-two-nodes")
    cluster_dashboard.watch.assert_clean()


def test_search_then_download_with_progress_then_delete(cluster_dashboard: DashboardPage[LiveNode],
                                                        two_nodes: list[LiveNode], fake_hub: FakeHub) -> None:
    alpha, beta = two_nodes
    page = cluster_dashboard.page
    cluster_dashboard.open("models")
    rows = page.get_by_test_id("model-row")
    expect(rows.first).to_be_visible()
    catalog = [m["card"] for m in alpha.json("/models")["models"]]

    page.get_by_test_id("model-search").fill("qwen2.5-0.5")
    expect(rows).to_have_count(sum("qwen2.5-0.5" in c["id"].lower() for c in catalog))
    page.get_by_test_id("model-search").fill("llama")  # the architecture matches too
    expect(rows).to_have_count(sum("llama" in (c["id"] + c["architecture"]).lower() for c in catalog))
    page.get_by_test_id("model-search").fill("no-such-model-anywhere")
    expect(rows).to_have_count(0)
    expect(page.get_by_test_id("models-no-match")).to_be_visible()
    page.get_by_test_id("model-search").fill(CATALOG_MODEL)
    row = page.locator(f"[data-testid=model-row][data-model-id='{CATALOG_MODEL}']")
    expect(rows).to_have_count(1)
    expect(row).to_contain_text("not downloaded")

    # a download goes to this node unless told otherwise; the other node can be ticked
    target = page.locator(f"[data-testid=download-node][data-node-id={alpha.node_id}]")
    other = page.locator(f"[data-testid=download-node][data-node-id={beta.node_id}]")
    expect(target).to_be_checked()
    expect(other).not_to_be_checked()
    expect(other).to_be_enabled()

    shards = sorted(name for name in fake_hub.repos[CATALOG_MODEL].files if name.endswith(".safetensors"))
    fake_hub.slow_files.add(shards[len(shards) // 2])  # the download stalls half-way through this file
    row.get_by_test_id("model-download").click()
    download = page.locator(f"[data-testid=download][data-model-id='{CATALOG_MODEL}']").first
    expect(download).to_have_attribute("data-state", "running")
    expect(download).to_contain_text("on alpha")
    expect(row.get_by_test_id("model-downloading")).to_have_text(re.compile(r"downloading ([1-9]\d?)%"))
    progress = download.get_by_test_id("download-progress")
    expect(progress).to_have_text(re.compile(r"^([1-9]\d?)% · "))
    expect(download.get_by_role("progressbar")).not_to_have_attribute("aria-valuenow", "0")
    cluster_dashboard.screenshot("models-downloading")

    # cancelled, it stops at the next chunk; the files it has stay, and the download resumes from them
    with page.expect_response(lambda r: r.request.method == "DELETE" and "/models/downloads/" in r.url) as answered:
        download.get_by_test_id("download-cancel").click()
    assert answered.value.ok
    fake_hub.slow_files.clear()
    expect(download).to_have_attribute("data-state", "cancelled", timeout=DOWNLOAD_TIMEOUT_MS)
    row.get_by_test_id("model-download").click()
    expect(row.get_by_test_id("model-download")).to_have_count(0, timeout=DOWNLOAD_TIMEOUT_MS)
    downloads = page.locator(f"[data-testid=download][data-model-id='{CATALOG_MODEL}']")
    expect(downloads).to_have_count(2)
    resumed = downloads.first  # running first, then the newest
    expect(resumed).to_have_attribute("data-state", "done", timeout=DOWNLOAD_TIMEOUT_MS)
    expect(resumed.get_by_test_id("download-progress")).to_have_text(re.compile(r"^100% · "))
    expect(row.get_by_test_id("model-on-disk")).to_be_visible(timeout=DOWNLOAD_TIMEOUT_MS)
    store = alpha.home / "models" / CATALOG_MODEL
    assert store.is_dir(), f"not in alpha's store: {store}"
    assert not (beta.home / "models" / CATALOG_MODEL).exists(), "in beta's store too"
    # the other node saw the download in the replicated state
    assert any(d["model"] == CATALOG_MODEL and d["node_id"] == alpha.node_id for d in beta.state()["downloads"].values())

    row.get_by_test_id("model-delete").click()
    expect(row.get_by_test_id("model-delete")).to_have_text("Confirm delete")
    row.get_by_test_id("model-delete").click()
    expect(row).to_contain_text("not downloaded", timeout=10_000)
    assert not store.exists()
    cluster_dashboard.screenshot("models-deleted")
    cluster_dashboard.watch.assert_clean()


def test_download_into_the_other_node_then_cancel_resume_and_delete_it_there(
        cluster_dashboard: DashboardPage[LiveNode], two_nodes: list[LiveNode], fake_hub: FakeHub) -> None:
    alpha, beta = two_nodes
    page = cluster_dashboard.page
    cluster_dashboard.open("models")
    page.get_by_test_id("model-search").fill(CATALOG_MODEL)
    row = page.locator(f"[data-testid=model-row][data-model-id='{CATALOG_MODEL}']")
    expect(row).to_contain_text("not downloaded")
    page.locator(f"[data-testid=download-node][data-node-id={alpha.node_id}]").uncheck()
    page.locator(f"[data-testid=download-node][data-node-id={beta.node_id}]").check()

    shards = sorted(name for name in fake_hub.repos[CATALOG_MODEL].files if name.endswith(".safetensors"))
    fake_hub.slow_files.add(shards[len(shards) // 2])
    row.get_by_test_id("model-download").click()
    on_beta = page.locator(f"[data-testid=download][data-model-id='{CATALOG_MODEL}'][data-node-id={beta.node_id}]")
    download = on_beta.first
    expect(download).to_have_attribute("data-state", "running")
    expect(download).to_contain_text("on beta")
    # the bytes before the stall reach this node's /state from beta, though no progress follows them
    expect(download.get_by_test_id("download-progress")).to_have_text(re.compile(r"^([1-9]\d?)% · "))
    expect(row.get_by_test_id("model-downloading")).to_contain_text("on beta")
    cluster_dashboard.screenshot("models-downloading-on-other-node")
    with page.expect_response(lambda r: r.request.method == "DELETE" and "/models/downloads/" in r.url) as answered:
        download.get_by_test_id("download-cancel").click()
    assert answered.value.ok
    fake_hub.slow_files.clear()
    expect(download).to_have_attribute("data-state", "cancelled", timeout=DOWNLOAD_TIMEOUT_MS)

    row.get_by_test_id("model-download").click()  # resumes on beta, the node still chosen
    expect(on_beta).to_have_count(2)
    expect(on_beta.first).to_have_attribute("data-state", "done", timeout=DOWNLOAD_TIMEOUT_MS)
    held = row.locator(f"[data-testid=model-on-node][data-node-id={beta.node_id}]")
    expect(held).to_have_text("on disk on beta", timeout=DOWNLOAD_TIMEOUT_MS)
    expect(row.get_by_test_id("model-on-disk")).to_have_count(0)  # not on this node
    assert (beta.home / "models" / CATALOG_MODEL / "config.json").is_file()
    assert not (alpha.home / "models" / CATALOG_MODEL).exists()
    assert beta.node_id in next(m for m in alpha.json("/models")["models"] if m["card"]["id"] == CATALOG_MODEL)[
        "on_nodes"]

    delete = row.locator(f"[data-testid=model-delete][data-node-id={beta.node_id}]")
    expect(delete).to_have_text("Delete on beta")
    delete.click()
    expect(delete).to_have_text("Confirm delete on beta")
    delete.click()
    expect(row).to_contain_text("not downloaded", timeout=10_000)
    assert not (beta.home / "models" / CATALOG_MODEL).exists()
    cluster_dashboard.watch.assert_clean()


def test_a_repo_outside_the_catalog_can_be_downloaded_by_name(cluster_dashboard: DashboardPage[LiveNode]) -> None:
    page = cluster_dashboard.page
    cluster_dashboard.open("models")
    page.get_by_test_id("model-search").fill("ringlet-test/not-on-the-hub")
    page.get_by_test_id("download-repo").click()
    download = page.locator("[data-testid=download][data-model-id='ringlet-test/not-on-the-hub']")
    # the hub has no such repo: the download fails, and says why
    expect(download).to_have_attribute("data-state", "failed", timeout=DOWNLOAD_TIMEOUT_MS)
    expect(download).to_contain_text(re.compile("not found|404", re.IGNORECASE))
    cluster_dashboard.watch.assert_clean()
