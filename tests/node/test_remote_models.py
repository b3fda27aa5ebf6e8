"""Two live nodes fetching from a local fake hub: through one node's API a model is downloaded into the other node's
store (its progress in the first node's /state), listed in that node's NodeInfo, cancelled, and deleted; an unknown
node is a 404, and the other node's own errors come back as they are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.hub import REPO_ID
from tests.support.processes import Cluster, LiveNode, wait_until

JOIN_S = 30
DOWNLOAD_S = 60


@pytest.fixture(scope="module")
def fake_hub(tiny_checkpoint: dict[str, bytes]) -> Iterator[FakeHub]:
    hub = FakeHub(repos={REPO_ID: HubRepo(dict(tiny_checkpoint))}).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def two_nodes(fake_hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LiveNode]]:
    cluster = Cluster(tmp_path_factory.mktemp("remote-models"),
                      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub.url}, own_homes=True)
    try:
        nodes = cluster.start("alpha", "beta")
        cluster.wait_agreed(2, timeout_s=JOIN_S)
        yield nodes
    finally:
        cluster.close()


def store_of(node: LiveNode) -> Path:
    return node.home / "models"


def delete(node: LiveNode, path: str, **params: str) -> httpx.Response:
    return httpx.delete(node.url + path, params=params, timeout=30)


def download_in_state(node: LiveNode, download_id: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = node.state()["downloads"].get(download_id)
    return found


def stored_on(node: LiveNode, about: LiveNode) -> dict[str, dict[str, Any]]:
    """The models `about`'s NodeInfo lists, as `node`'s state has it."""
    return {m["model"]: m for m in node.state()["nodes"][about.node_id]["models"]}


def slow_shard(hub: FakeHub) -> str:
    shards = sorted(name for name in hub.repos[REPO_ID].files if name.endswith(".safetensors"))
    return shards[len(shards) // 2]


def test_a_download_started_through_one_node_fills_the_other_nodes_store(two_nodes: list[LiveNode],
                                                                         fake_hub: FakeHub) -> None:
    alpha, beta = two_nodes
    stalled = slow_shard(fake_hub)
    fake_hub.slow_files.add(stalled)  # the download waits half-way through this file
    started = alpha.post("/models/download", json={"model": REPO_ID, "node_id": beta.node_id})
    assert started.status_code == 202, started.text
    download_id = started.json()["download_id"]
    assert started.json()["state"] == "running"

    def stalled_half_way() -> bool:
        record = download_in_state(alpha, download_id)
        # the bytes before the stall reach alpha's state, though no more progress follows them
        return record is not None and record["state"] == "running" and 0 < record["done"] < record["total"]

    wait_until(stalled_half_way, DOWNLOAD_S, "beta's download progress in alpha's /state", beta.log)
    assert download_in_state(alpha, download_id)["node_id"] == beta.node_id  # type: ignore[index]
    followed = alpha.json(f"/models/downloads/{download_id}")  # a download of another node, from the state
    assert followed["model"] == REPO_ID and followed["state"] == "running"
    fake_hub.slow_files.discard(stalled)

    def finished() -> bool:
        record = download_in_state(alpha, download_id)
        assert record is None or record["state"] in ("running", "done"), record
        return record is not None and record["state"] == "done" and record["done"] == record["total"] > 0

    wait_until(finished, DOWNLOAD_S, "the download done in alpha's /state", beta.log)
    assert (store_of(beta) / REPO_ID / "config.json").is_file(), "in beta's store"
    assert not (store_of(alpha) / REPO_ID).exists(), "not in alpha's store"
    wait_until(lambda: REPO_ID in stored_on(alpha, beta), 10, "beta's NodeInfo listing the model", beta.log)
    listed = stored_on(alpha, beta)[REPO_ID]
    assert listed["status"] == "complete" and listed["bytes"] > 0
    assert REPO_ID not in stored_on(beta, alpha)

    absent = delete(alpha, f"/models/{REPO_ID}", node_id=alpha.node_id)  # alpha has no copy to delete
    assert absent.status_code == 404 and REPO_ID in absent.json()["error"]["message"]
    deleted = delete(alpha, f"/models/{REPO_ID}", node_id=beta.node_id)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"model": REPO_ID, "node_id": beta.node_id}
    assert not (store_of(beta) / REPO_ID).exists()
    wait_until(lambda: REPO_ID not in stored_on(alpha, beta), 10, "beta's NodeInfo without the model", beta.log)
    again = delete(alpha, f"/models/{REPO_ID}", node_id=beta.node_id)
    assert again.status_code == 404 and "not in the store" in again.json()["error"]["message"]


def test_a_download_on_the_other_node_is_cancelled_through_this_one(two_nodes: list[LiveNode],
                                                                    fake_hub: FakeHub) -> None:
    alpha, beta = two_nodes
    stalled = slow_shard(fake_hub)
    fake_hub.slow_files.add(stalled)
    try:
        started = alpha.post("/models/download", json={"model": REPO_ID, "node_id": beta.node_id})
        assert started.status_code == 202, started.text
        download_id = started.json()["download_id"]
        wait_until(lambda: download_in_state(alpha, download_id) is not None, 10, "the download in alpha's /state")
        cancelled = delete(alpha, f"/models/downloads/{download_id}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["download_id"] == download_id
    finally:
        fake_hub.slow_files.discard(stalled)

    def stopped() -> bool:
        record = download_in_state(alpha, download_id)
        return record is not None and record["state"] == "cancelled"

    wait_until(stopped, DOWNLOAD_S, "the download cancelled in alpha's /state", beta.log)
    assert "resume" in (download_in_state(alpha, download_id) or {}).get("error", "")
    assert stored_on(alpha, beta).get(REPO_ID, {}).get("status") != "complete"
    assert delete(alpha, f"/models/{REPO_ID}", node_id=beta.node_id).status_code == 200  # the files it had fetched


def test_unknown_nodes_and_the_other_nodes_errors_are_answered(two_nodes: list[LiveNode]) -> None:
    alpha, beta = two_nodes
    unknown = alpha.post("/models/download", json={"model": REPO_ID, "node_id": "node-nowhere"})
    assert unknown.status_code == 404
    assert "no node 'node-nowhere'" in unknown.json()["error"]["message"]
    assert unknown.json()["error"]["code"] == "node_not_found"
    gone = delete(alpha, "/models/org/name", node_id="node-nowhere")
    assert gone.status_code == 404 and "node-nowhere" in gone.json()["error"]["message"]

    bad = alpha.post("/models/download", json={"model": "not a repo id", "node_id": beta.node_id})
    assert bad.status_code == 400, bad.text  # beta's own answer to the name
    assert "not a repo id" in bad.json()["error"]["message"]
    no_download = delete(alpha, "/models/downloads/no-such-download")
    assert no_download.status_code == 404 and "no download with id" in no_download.json()["error"]["message"]
    extra = alpha.post("/models/download", json={"model": REPO_ID, "node": beta.node_id})
    assert extra.status_code == 400  # an unknown field, not a download on this node
