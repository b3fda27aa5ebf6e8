"""apply(state, event): small direct tests of the pure state machine."""

from __future__ import annotations

from pydantic import TypeAdapter

from ringlet.shared.instances import Instance, InstanceType, Shard
from ringlet.shared.state import (
    DownloadProgressed,
    DownloadRecord,
    Event,
    InstanceCreated,
    InstanceDeleted,
    Link,
    LinkDown,
    LinkUp,
    MasterChanged,
    NodeJoined,
    NodeLeft,
    NodeUpdated,
    RingAddress,
    RingHosted,
    RunnerFailed,
    RunnerProgressed,
    RunnerReady,
    RunnerStatus,
    State,
    apply,
)
from tests.support.node_infos import node_info

EVENTS: TypeAdapter[Event] = TypeAdapter(Event)


def two_stage_instance(instance_id: str = "inst-1") -> Instance:
    return Instance(instance_id=instance_id, model="m", instance_type=InstanceType.CPU_RING, shards=[
        Shard(node_id="a", rank=0, start=0, end=10, num_layers=20),
        Shard(node_id="b", rank=1, start=10, end=20, num_layers=20),
    ])


def fold(*events: Event) -> State:
    state = State()
    for event in events:
        state = apply(state, event)
    return state


def test_nodes_join_update_and_leave() -> None:
    a, b = node_info("a", 8), node_info("b", 16)
    state = fold(NodeJoined(node=a), NodeJoined(node=b), LinkUp(link=Link(source="a", target="b")))
    assert set(state.nodes) == {"a", "b"} and len(state.links) == 1 and state.last_event == 3
    state = apply(state, NodeUpdated(node=node_info("a", 2)))
    assert state.nodes["a"].memory.available_bytes == 2 * 1024**3
    for node_id in ("a", "b"):
        state = apply(state, DownloadProgressed(download=DownloadRecord(download_id=f"d-{node_id}", node_id=node_id,
                                                                        model="m", state="running")))
    state = apply(state, NodeLeft(node_id="b"))
    assert set(state.nodes) == {"a"} and state.links == []
    assert set(state.downloads) == {"d-a"}, "a departed node's downloads go with it"


def test_link_up_replaces_and_link_down_removes() -> None:
    state = fold(LinkUp(link=Link(source="a", target="b", latency_ms=1.0)),
                 LinkUp(link=Link(source="a", target="b", latency_ms=0.2)))
    assert [k.latency_ms for k in state.links] == [0.2]
    assert apply(state, LinkDown(source="a", target="b")).links == []


def test_instance_runners_load_then_ready() -> None:
    state = fold(InstanceCreated(instance=two_stage_instance(), created_at=1.0))
    record = state.instances["inst-1"]
    assert record.status == RunnerStatus.LOADING and set(record.runners) == {"a", "b"}
    state = fold(InstanceCreated(instance=two_stage_instance(), created_at=1.0),
                 RunnerProgressed(instance_id="inst-1", node_id="a", progress=0.5, detail="loading weights", pid=7),
                 RunnerReady(instance_id="inst-1", node_id="b", context_length=4096))
    record = state.instances["inst-1"]
    assert record.status == RunnerStatus.LOADING and record.progress == 0.5 and record.runners["a"].pid == 7
    state = apply(state, RunnerReady(instance_id="inst-1", node_id="a", context_length=2048))
    record = state.instances["inst-1"]
    assert record.status == RunnerStatus.READY and record.context_length == 2048
    assert record.runners["a"].pid == 7, "a report without a pid keeps the known one"


def test_a_failed_runner_fails_the_instance_and_stays_failed() -> None:
    state = fold(InstanceCreated(instance=two_stage_instance(), created_at=1.0),
                 RunnerFailed(instance_id="inst-1", node_id="b", error="killed by SIGKILL"),
                 RunnerReady(instance_id="inst-1", node_id="b", context_length=10))
    record = state.instances["inst-1"]
    assert record.status == RunnerStatus.FAILED and record.error == "b: killed by SIGKILL"
    assert record.runners["b"].status == RunnerStatus.FAILED


def test_node_leaving_fails_its_runners() -> None:
    state = fold(NodeJoined(node=node_info("a", 8)), NodeJoined(node=node_info("b", 8)),
                 InstanceCreated(instance=two_stage_instance(), created_at=1.0), NodeLeft(node_id="b"))
    assert state.instances["inst-1"].status == RunnerStatus.FAILED
    assert "left the cluster" in (state.instances["inst-1"].error or "")


def test_events_about_deleted_instances_change_nothing_but_the_count() -> None:
    state = fold(InstanceCreated(instance=two_stage_instance(), created_at=1.0), InstanceDeleted(instance_id="inst-1"))
    later = apply(state, RunnerProgressed(instance_id="inst-1", node_id="a", progress=0.9, detail="warming up"))
    assert later.instances == {} and later.last_event == state.last_event + 1


def test_events_round_trip_as_json_through_the_discriminated_union() -> None:
    events: list[Event] = [NodeJoined(node=node_info("a", 8)), InstanceCreated(instance=two_stage_instance(),
                                                                               created_at=1.0),
                           RunnerReady(instance_id="inst-1", node_id="a", context_length=8), NodeLeft(node_id="a")]
    decoded = [EVENTS.validate_json(EVENTS.dump_json(e)) for e in events]
    assert decoded == events
    assert fold(*decoded) == fold(*events)


def test_state_serialises_with_derived_status() -> None:
    state = fold(InstanceCreated(instance=two_stage_instance(), created_at=1.0))
    dumped = state.model_dump(mode="json")
    assert dumped["instances"]["inst-1"]["status"] == "loading"
    assert dumped["instances"]["inst-1"]["instance"]["instance_type"] == "CpuRing"


def test_ring_address_is_recorded_and_ignored_for_unknown_instances() -> None:
    address = RingAddress(host="127.0.0.1", port=40000)
    state = fold(InstanceCreated(instance=two_stage_instance(), created_at=1.0),
                 RingHosted(instance_id="inst-1", address=address))
    assert state.instances["inst-1"].ring == address
    assert apply(state, RingHosted(instance_id="gone", address=address)).instances == state.instances


def test_master_change_is_part_of_the_state() -> None:
    state = apply(State(), MasterChanged(node_id="a"))
    assert state.master == "a" and state.last_event == 1
