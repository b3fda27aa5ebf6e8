"""POST /models/download through the node's API against the fake hub: progress in /state, cancel, errors; the store
listed in the node's NodeInfo; DELETE /models/{model} (a lone node: another node's id is unknown)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from ringlet.api.app import create_app
from ringlet.node import Node
from tests.support.fake_hub import FakeHub
from tests.support.hub import REPO_ID
from tests.support.node_infos import node_info


async def exercise(node: Node) -> dict[str, Any]:
    await node.start()
    try:
        app = create_app(node)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            started = await client.post("/models/download", json={"model": REPO_ID})
            assert started.status_code == 202, started.text
            download_id = started.json()["download_id"]
            for _ in range(300):
                status = (await client.get(f"/models/downloads/{download_id}")).json()
                if status["state"] != "running":
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)  # the last event reaches the state on the loop
            state = (await client.get("/state")).json()
            listed = (await client.get("/models/downloads")).json()
            again = await client.post("/models/download", json={"model": REPO_ID, "node_id": node.node_id})
            await asyncio.to_thread(node.downloads.wait, again.json()["download_id"], 30)
            elsewhere = await client.post("/models/download", json={"model": REPO_ID, "node_id": "node-elsewhere"})
            deleted = await client.delete(f"/models/{REPO_ID}")
            await asyncio.sleep(0.2)
            return {
                "status": status,
                "state": state,
                "again": again,
                "elsewhere": elsewhere,
                "deleted": deleted,
                "deleted_again": await client.delete(f"/models/{REPO_ID}", params={"node_id": node.node_id}),
                "listed_after": (await client.get("/state")).json()["nodes"][node.node_id]["models"],
                "listed": listed,
                "unknown": await client.delete("/models/downloads/nope"),
                "bad_name": await client.post("/models/download", json={"model": "not a repo id!"}),
                "bad_layers": await client.post("/models/download", json={"model": REPO_ID, "layers": [3, 1]}),
                "too_many": await too_many(client, node),
            }
    finally:
        await node.stop()


async def too_many(client: httpx.AsyncClient, node: Node) -> httpx.Response:
    """A start past the downloads a node runs at once is a 429 (here it runs none)."""
    node.downloads.max_running = 0
    try:
        return await client.post("/models/download", json={"model": REPO_ID, "layers": [0, 1]})
    finally:
        node.downloads.max_running = 2


def test_download_through_the_api(hub: FakeHub) -> None:
    # a thread of its own: another test's Playwright session may hold an event loop on this one
    with ThreadPoolExecutor(1) as pool:
        seen = pool.submit(lambda: asyncio.run(exercise(Node(node_info("a", 8))))).result(timeout=120)
    status = seen["status"]
    assert status["state"] == "done" and status["done"] == status["total"] > 0, status
    record = seen["state"]["downloads"][status["download_id"]]
    assert record["state"] == "done" and record["done"] == record["total"] and record["node_id"]
    assert [d["download_id"] for d in seen["listed"]] == [status["download_id"]]
    assert seen["unknown"].status_code == 404 and "nope" in seen["unknown"].json()["error"]["message"]
    assert seen["bad_name"].status_code == 400 and seen["bad_name"].json()["error"]["param"] == "model"
    assert seen["bad_layers"].status_code in (400, 422)
    refused = seen["too_many"]
    assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
    assert "downloads are running on this node" in refused.json()["error"]["message"]
    assert hub.file_gets("model.safetensors.index.json")  # it really went through the hub
    listed = {m["model"]: m for m in seen["state"]["nodes"][record["node_id"]]["models"]}
    assert listed[REPO_ID]["status"] == "complete" and listed[REPO_ID]["bytes"] > 0
    assert seen["again"].status_code == 202  # this node's own id: as without one
    elsewhere = seen["elsewhere"]
    assert elsewhere.status_code == 404 and "node-elsewhere" in elsewhere.json()["error"]["message"]
    deleted = seen["deleted"]
    assert deleted.status_code == 200 and deleted.json() == {"model": REPO_ID, "node_id": record["node_id"]}
    assert seen["deleted_again"].status_code == 404
    assert REPO_ID not in {m["model"] for m in seen["listed_after"]}
