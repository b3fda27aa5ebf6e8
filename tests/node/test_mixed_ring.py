"""A mixed ring through real nodes: one node started with `--engine mlx` (MLX on the CPU here), one with
`--engine cpu` (torch); a MixedRing over both, in either order, completes greedily with exactly the text of a
single-node instance of the same precision (fp32, set for every test node)."""

from __future__ import annotations

import pytest

from tests.support.instances import complete, create, delete, stream
from tests.support.processes import Cluster

pytestmark = pytest.mark.slow


def test_mixed_ring_of_an_mlx_node_and_a_torch_node_matches_single_node(cluster: Cluster) -> None:
    pytest.importorskip("mlx_lm")
    mac, pc = cluster.launch("mac", "--engine", "mlx"), cluster.launch("pc", "--engine", "cpu")
    mac, pc = mac.wait_healthy(), pc.wait_healthy()
    state = cluster.wait_agreed(2)
    engines = {info["name"]: info["engines"]["selected_engine"] for info in state["nodes"].values()}
    assert engines == {"mac": "mlx", "pc": "cpu"}
    mac_id, pc_id = mac.node_id, pc.node_id

    single = create(pc, cluster, [pc_id])
    expected = complete(pc)["choices"][0]["text"]
    assert expected.strip()
    delete(pc, single)

    for ring, asked_on in (([mac_id, pc_id], pc), ([pc_id, mac_id], mac)):
        mixed = create(asked_on, cluster, ring, "MixedRing")
        record = asked_on.get(f"/instance/{mixed}").json()
        assert [s["engine"] for s in record["instance"]["shards"]] == ["mlx" if i == mac_id else "cpu" for i in ring]
        assert record["instance"]["instance_type"] == "MixedRing"
        assert complete(mac)["choices"][0]["text"] == expected
        text, events = stream(pc)
        assert text == expected and len(events) >= 3
        delete(asked_on, mixed)
