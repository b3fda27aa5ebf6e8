"""A Hugging Face repo that no node holds: placing it reads its card from the hub, the runner fetches its stage's
files into the store, then loads and serves; a repo the hub lacks is a 400 saying so."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fake_hub import FakeHub
from tests.support.hub import REPO_ID
from tests.support.processes import LOAD_TIMEOUT_S, start_node, stop_node, wait_until


@pytest.mark.slow
def test_placing_a_repo_not_on_disk_downloads_then_serves_it(tmp_path: Path, hub: FakeHub) -> None:
    node = start_node(tmp_path, "hub-node", "--no-default-instance",
                      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "RINGLET_CPU_COMPILE": "0"})
    try:
        created = node.post("/instance", json={"model": REPO_ID, "instance_type": "CpuRing"})
        assert created.status_code == 201, created.text
        instance_id = created.json()["instance"]["instance_id"]

        def ready() -> bool:
            record = node.state()["instances"][instance_id]
            assert record["status"] != "failed", record
            return record["status"] == "ready"

        wait_until(ready, LOAD_TIMEOUT_S, "the downloaded model ready", node.log)
        assert (tmp_path / "home" / "models" / REPO_ID).is_dir(), "fetched into the node's store"
        answer = node.post("/v1/chat/completions", json={"model": REPO_ID, "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 200, answer.text
        assert REPO_ID in {m["id"] for m in node.json("/v1/models")["data"]}
        unknown = node.post("/instance", json={"model": "ringlet-test/no-such-repo"})
        assert unknown.status_code == 400 and "not found" in unknown.json()["error"]["message"]
    finally:
        assert stop_node(node) == 0, node.log()
