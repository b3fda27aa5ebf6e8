"""An MLX instance behind a live node serves requests together, through mlx-lm's batch generator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.processes import LOAD_TIMEOUT_S, start_node, stop_node, wait_until
from tests.support.streams import join_a_running_stream

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
        assert sorted(asyncio.run(join_a_running_stream(node.url, model))) == ["B", "C", "hog still streaming"]
        assert wait_until(lambda: not node.state()["tasks"], 10, "the hog's cancel") < 10
    finally:
        assert stop_node(node) == 0, node.log()
