"""Pure pieces of the cluster: the events it adds to `apply`, the supervisor's plan for multi-stage rings, placement
over several nodes, and the wire format of control-plane messages."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from ringlet.master.placement import PlacementError, place
from ringlet.models.catalog import embedded_card
from ringlet.net.codec import BadMessageError, decode, encode
from ringlet.net.messages import ORDERED, Ordered
from ringlet.shared.instances import Instance, InstanceType, Shard
from ringlet.shared.state import (
    InstanceCreated,
    MasterChanged,
    NodeInfo,
    NodeJoined,
    NodeLeft,
    RingAddress,
    RingHosted,
    RunnerStatus,
    State,
    apply,
)
from ringlet.worker.supervisor import plan
from tests.api.node_infos import node_info


def node(node_id: str, free_gib: float = 8.0) -> NodeInfo:
    return node_info(node_id, free_gib)


def two_stage() -> Instance:
    return Instance(instance_id="inst-1", model="m", instance_type="CpuRing", shards=[
        Shard(node_id="a", rank=0, start=0, end=15, num_layers=30),
        Shard(node_id="b", rank=1, start=15, end=30, num_layers=30)])


def with_instance() -> State:
    state = State()
    for n in ("a", "b"):
        state = apply(state, NodeJoined(node=node(n)))
    return apply(state, InstanceCreated(instance=two_stage(), created_at=0.0))


def test_ring_address_is_recorded_and_ignored_for_unknown_instances() -> None:
    address = RingAddress(host="127.0.0.1", port=40000)
    state = apply(with_instance(), RingHosted(instance_id="inst-1", address=address))
    assert state.instances["inst-1"].ring == address
    assert apply(state, RingHosted(instance_id="gone", address=address)).instances == state.instances


def test_master_change_is_part_of_the_state() -> None:
    state = apply(State(), MasterChanged(node_id="a"))
    assert state.master == "a" and state.last_event == 1


def test_later_stage_starts_only_once_the_ring_is_hosted() -> None:
    state = with_instance()
    start_a, _ = plan(state, "a", [])
    start_b, _ = plan(state, "b", [])
    assert [s.bound.shard.rank for s in start_a] == [0] and start_b == []
    state = apply(state, RingHosted(instance_id="inst-1", address=RingAddress(host="10.0.0.1", port=4000)))
    start_b, _ = plan(state, "b", [], data_host="10.0.0.2")
    assert start_b[0].ring == RingAddress(host="10.0.0.1", port=4000) and start_b[0].data_host == "10.0.0.2"


def test_a_node_leaving_stops_the_other_stages_and_does_not_restart_them() -> None:
    state = apply(with_instance(), NodeLeft(node_id="b"))
    assert state.instances["inst-1"].runners["b"].status == RunnerStatus.FAILED
    start, stop = plan(state, "a", ["inst-1"])
    assert stop == ["inst-1"] and start == []
    assert plan(state, "a", []) == ([], [])


def test_placement_of_the_embedded_model_over_three_nodes() -> None:
    card = embedded_card()
    nodes = [node("a", 8.0), node("b", 8.0), node("c", 16.0)]
    placement = place(card, InstanceType.CPU_RING, nodes, instance_id="x", node_ids=["a", "b", "c"])
    assert [(s.start, s.end) for s in placement.instance.shards] == [(0, 8), (8, 16), (16, 30)]
    with pytest.raises(PlacementError, match="IpexRing needs a node with an Intel GPU; none of the 3 nodes"):
        place(card, InstanceType.IPEX_RING, nodes, instance_id="x")


def test_messages_are_validated_json_and_garbage_is_refused() -> None:
    message = Ordered(master="a", seq=3, event=MasterChanged(node_id="a"))
    assert decode(ORDERED, encode(message), "t") == message
    with pytest.raises(BadMessageError, match="malformed message on t"):
        decode(ORDERED, b"\x80\x04\x95 pickle bytes", "t")
    with pytest.raises(BadMessageError):
        decode(TypeAdapter(Ordered), b'{"master": "a", "seq": 0, "event": {"kind": "master_changed", "node_id": "a"}}',
               "t")
