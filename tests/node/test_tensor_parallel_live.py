"""Tensor parallelism on live nodes (CPU processes over gloo, fp32): the embedded model (9 attention heads, 3 key/value
heads) split over 3 ranks gives exactly the unsplit greedy tokens, alone and as 2 pipeline stages of 3 ranks each;
an embeddings request the model refuses leaves the ranks in step; a rank killed mid-service makes the runner exit,
and the node starts it again, ranks and all."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import psutil
import pytest

from tests.support.instances import MODEL, complete, create, delete, stream
from tests.support.processes import Cluster, LiveNode, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[LiveNode]]]:
    cluster = Cluster(tmp_path_factory.mktemp("tensor-parallel"))
    try:
        nodes = cluster.start("tp1", "tp2")
        cluster.wait_agreed(2)
        yield cluster, nodes
    finally:
        cluster.close()


def runners_of(node: LiveNode) -> list[int]:
    """The pids of the node's own runners (the state lists every node's)."""
    return [r["pid"] for record in node.state()["instances"].values() for r in record["runners"].values()
            if r["pid"] and r["node_id"] == node.node_id]


def ranks_of(node: LiveNode) -> list[psutil.Process]:
    """The tensor-parallel ranks the node's runners started."""
    return [child for pid in runners_of(node) for child in psutil.Process(pid).children()
            if "ringlet.worker.tensor_ranks" in " ".join(child.cmdline())]


def test_three_ranks_give_the_unsplit_tokens_survive_a_lost_rank_and_run_as_stages(pair: tuple[Cluster, list[LiveNode]]
                                                                          ) -> None:
    cluster, nodes = pair
    node, ids = nodes[0], [n.node_id for n in nodes]
    whole = create(node, cluster, ids[:1])
    expected = complete(node)["choices"][0]["text"]
    assert expected.strip()
    delete(node, whole)

    split = create(node, cluster, ids[:1], tensor_parallel=3)
    assert node.get(f"/instance/{split}").json()["instance"]["tensor_parallel"] == 3
    assert len(ranks_of(node)) == 2
    assert complete(node)["choices"][0]["text"] == expected
    assert stream(node)[0] == expected
    refused = node.post("/v1/embeddings", json={"model": MODEL, "input": "hello"})
    assert refused.status_code == 400, refused.text
    assert complete(node)["choices"][0]["text"] == expected  # the ranks are still in step

    # a rank killed: the runner exits, and the node starts it again with its ranks
    [runner] = runners_of(node)
    os.kill(ranks_of(node)[0].pid, signal.SIGKILL)
    wait_until(lambda: runner not in runners_of(node), 10, "the runner exits once a rank has", cluster.logs)

    def serving_again() -> bool:
        return node.get(f"/instance/{split}").json()["status"] == "ready" and len(ranks_of(node)) == 2

    wait_until(serving_again, 120, "the runner started again with its ranks", cluster.logs)
    assert complete(node)["choices"][0]["text"] == expected
    delete(node, split)
    wait_until(lambda: not ranks_of(node), 10, "the ranks gone with their runner", cluster.logs)

    both = create(node, cluster, ids, tensor_parallel=3)
    assert len(ranks_of(nodes[0])) == len(ranks_of(nodes[1])) == 2
    assert complete(node)["choices"][0]["text"] == expected
    assert stream(nodes[1])[0] == expected  # forwarded to the first stage's node
    delete(node, both)
