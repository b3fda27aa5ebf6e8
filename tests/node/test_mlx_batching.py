"""An MLX instance behind a live node serves requests together, through mlx-lm's batch generator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.node.test_queue_and_disconnect import LONG, chat_body
from tests.support.processes import LOAD_TIMEOUT_S, start_node, stop_node, wait_until

pytest.importorskip("mlx_lm", reason="the mlx engine needs mlx, mlx-cpu and mlx-lm (pip install them)")


@pytest.mark.slow
def test_mlx_requests_join_a_running_stream_and_finish_while_it_goes_on(tmp_path: Path) -> None:
    node = start_node(tmp_path, "mlx-node", "--engine", "mlx")
    try:
        wait_until(lambda: node.ready_instances() or not node.alive(), LOAD_TIMEOUT_S, "the MLX instance ready",
                   node.log)
        instance = node.ready_instances()[0]
        assert instance["instance"]["shards"][0]["engine"] == "mlx", instance
        model = instance["instance"]["model"]

        async def scenario() -> list[str]:
            finished: list[str] = []
            async with httpx.AsyncClient(base_url=node.url, timeout=120) as client:

                async def short(name: str) -> None:
                    reply = await client.post("/v1/chat/completions", json=chat_body(model, 2, False))
                    assert reply.status_code == 200, reply.text
                    assert reply.json()["usage"]["completion_tokens"] == 2
                    finished.append(name)

                async with client.stream("POST", "/v1/chat/completions", json=chat_body(model, LONG, True)) as hog:
                    lines = hog.aiter_lines()
                    await anext(lines)
                    await asyncio.wait_for(asyncio.gather(short("B"), short("C")), 60)
                    tasks = (await client.get("/state")).json()["tasks"].values()
                    assert [t["status"] for t in tasks] == ["running"], "the long stream goes on"
                    finished.append("long stream still going")
            return finished

        assert sorted(asyncio.run(scenario())) == ["B", "C", "long stream still going"]
        assert wait_until(lambda: not node.state()["tasks"], 10, "the long stream's cancel") < 10
    finally:
        assert stop_node(node) == 0, node.log()
