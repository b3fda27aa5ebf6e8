"""An MLX instance behind a live node serves requests together, through mlx-lm's batch generator; and a node started
with `--engine mlx` serves a model of an architecture only mlx-lm has, giving transformers' greedy tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from ringlet.models.tokenizer import Tokenizer
from tests.support.mlx_only_models import reference_greedy, starcoder2_checkpoint
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


@pytest.mark.slow
def test_an_mlx_node_serves_a_model_only_mlx_lm_has(tmp_path: Path) -> None:
    checkpoint = starcoder2_checkpoint(tmp_path / "starcoder2", tied=False, seed=1)
    node = start_node(tmp_path, "mlx-node", "--engine", "mlx", "--model", str(checkpoint),
                      env={"RINGLET_PRECISION": "fp32"})
    try:
        wait_until(lambda: node.ready_instances() or not node.alive(), LOAD_TIMEOUT_S, "the MLX instance ready",
                   node.log)
        [record] = node.ready_instances()
        assert record["instance"]["instance_type"] == "MlxRing", record
        reply = httpx.post(node.url + "/v1/completions", timeout=60, json={
            "model": record["instance"]["model"], "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        tokenizer = Tokenizer.from_hf_dir(checkpoint)
        greedy = reference_greedy(checkpoint, tokenizer.encode("def fibonacci(n):"), 8)
        assert reply.json()["choices"][0]["text"] == tokenizer.decode(greedy)
    finally:
        assert stop_node(node) == 0, node.log()
