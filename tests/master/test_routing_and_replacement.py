"""Which instance serves a request, and what the master orders when a node leaves: pure functions of the state."""

from __future__ import annotations

import pytest

from ringlet.master.replacement import lost_node_events, reform_events
from ringlet.master.routing import route
from ringlet.models.catalog import embedded_card
from ringlet.shared.errors import ModelNotFoundError, NoInstanceError
from ringlet.shared.instances import Instance, InstanceType, Shard
from ringlet.shared.state import (
    InstanceCreated,
    InstanceDeleted,
    NodeJoined,
    NodeLeft,
    RunnerFailed,
    RunnerReady,
    State,
    apply,
)
from tests.support.node_infos import node_info

MODEL = embedded_card().id


def resolve(name: str):  # type: ignore[no-untyped-def]
    if name.lower() in (MODEL.lower(), "default"):
        return embedded_card()
    raise ModelNotFoundError(name, [MODEL])


def instance(instance_id: str, nodes: tuple[str, ...]) -> Instance:
    layers = 30
    bounds = [(i * layers // len(nodes), (i + 1) * layers // len(nodes)) for i in range(len(nodes))]
    return Instance(instance_id=instance_id, model=MODEL, instance_type=InstanceType.CPU_RING,
                    shards=[Shard(node_id=n, rank=r, start=s, end=e, num_layers=layers)
                            for r, (n, (s, e)) in enumerate(zip(nodes, bounds, strict=True))])


def state_with(*instances: tuple[Instance, bool]) -> State:
    state = State()
    for node_id in ("a", "b", "c"):
        state = apply(state, NodeJoined(node=node_info(node_id, 8)))
    for inst, ready in instances:
        state = apply(state, InstanceCreated(instance=inst, created_at=0.0))
        if ready:
            for shard in inst.shards:
                state = apply(state, RunnerReady(instance_id=inst.instance_id, node_id=shard.node_id,
                                                 context_length=8192))
    return state


def test_the_least_busy_reachable_ready_instance_serves() -> None:
    state = state_with((instance("i1", ("a",)), True), (instance("i2", ("b",)), True), (instance("i3", ("a",)), False))
    assert route(state, "default", resolve, "a", clustered=True, busy={"i1": 2, "i2": 1}).instance.instance_id == "i2"
    assert route(state, MODEL, resolve, "a", clustered=False, busy={"i1": 5}).instance.instance_id == "i1", \
        "without a cluster only this node's instances can be reached"
    assert route(state, "i2", resolve, "a", clustered=True, busy={"i2": 9}).instance.instance_id == "i2", \
        "an instance id picks that instance"
    with pytest.raises(NoInstanceError, match="instance i3 of SmolLM2-135M-Instruct is still loading"):
        route(state, "i3", resolve, "a", clustered=True, busy={})


def test_an_instance_with_a_stage_on_a_gone_node_serves_nothing_while_another_can() -> None:
    state = state_with((instance("i1", ("a", "b")), True), (instance("i2", ("c",)), True))
    assert route(state, MODEL, resolve, "a", clustered=True, busy={"i2": 9}, gone={"b"}).instance.instance_id == "i2"
    with pytest.raises(NoInstanceError, match="instance i1 of .* has a stage on node b, which is gone") as error:
        route(state, MODEL, resolve, "a", clustered=True, busy={}, gone={"b", "c"})
    assert error.value.loading, "a 503 with Retry-After: the node may come back, or the instance be placed again"


def test_refusals_say_what_to_do() -> None:
    loading = state_with((instance("i1", ("a",)), False))
    with pytest.raises(NoInstanceError, match="still loading") as error:
        route(loading, MODEL, resolve, "a", clustered=True, busy={})
    assert error.value.loading
    with pytest.raises(NoInstanceError, match="no instance of SmolLM2-135M-Instruct is running; create one"):
        route(state_with(), MODEL, resolve, "a", clustered=True, busy={})
    with pytest.raises(NoInstanceError, match="start on other nodes"):
        route(state_with((instance("i1", ("b",)), True)), MODEL, resolve, "a", clustered=False, busy={})
    with pytest.raises(ModelNotFoundError):
        route(state_with(), "nope", resolve, "a", clustered=True, busy={})


def test_a_lost_node_is_removed_and_its_instances_placed_again_on_the_survivors() -> None:
    state = state_with((instance("i1", ("a", "b")), True), (instance("i2", ("c",)), True))
    ids = iter(["new-1"])
    events, notes = lost_node_events(state, "b", resolve, lambda: next(ids), now=5.0)
    assert [type(e).__name__ for e in events] == ["NodeLeft", "InstanceDeleted", "InstanceCreated"]
    assert events[0] == NodeLeft(node_id="b") and events[1] == InstanceDeleted(instance_id="i1", replaced_by="new-1")
    created = events[2]
    assert isinstance(created, InstanceCreated) and created.created_at == 5.0
    assert created.instance.instance_id == "new-1"
    assert {s.node_id for s in created.instance.shards} <= {"a", "c"}
    assert notes == ["instance i1 lost node b; placed again as new-1"]
    after = state
    for event in events:
        after = apply(after, event)
    assert set(after.instances) == {"i2", "new-1"} and "b" not in after.nodes


def test_an_instance_that_fits_nowhere_any_more_is_deleted_with_a_note() -> None:
    state = state_with((instance("i1", ("a",)), True))
    events, notes = lost_node_events(state, "a", lambda name: (_ for _ in ()).throw(ModelNotFoundError(name, [])),
                                     lambda: "x", now=0.0)
    assert events == [NodeLeft(node_id="a"), InstanceDeleted(instance_id="i1")]
    assert notes[0].startswith("instance i1 lost node a and cannot be placed again: model")


def test_a_failed_ring_is_formed_again_on_its_nodes_or_where_it_fits() -> None:
    state = state_with((instance("i1", ("a", "b")), True))
    state = apply(state, RunnerFailed(instance_id="i1", node_id="b", error="stalled", reform=True))
    events, note = reform_events(state, "i1", resolve, lambda: "new-1", now=5.0)
    assert events[0] == InstanceDeleted(instance_id="i1", replaced_by="new-1")
    created = events[1]
    assert isinstance(created, InstanceCreated)
    assert [s.node_id for s in created.instance.shards] == ["a", "b"], "the same nodes, so the same ring"
    assert note == "instance i1 failed; placed again as new-1"

    without_b = apply(state, NodeLeft(node_id="b"))
    events, _ = reform_events(without_b, "i1", resolve, lambda: "new-2", now=6.0)
    created = events[1]
    assert isinstance(created, InstanceCreated) and "b" not in {s.node_id for s in created.instance.shards}


def test_an_ipex_ring_placed_again_keeps_its_devices_and_optimisation_level() -> None:
    from tests.support.node_infos import intel_gpu_node

    state = State()
    for node_id in ("a", "b"):
        state = apply(state, NodeJoined(node=intel_gpu_node(node_id, 8, 16)))
    chosen = Instance(instance_id="i1", model=MODEL, instance_type=InstanceType.IPEX_RING,
                      shards=[Shard(node_id="b", rank=0, start=0, end=30, num_layers=30, engine="ipex")],
                      intel_gpu_devices=(0,), ipex_optimization_level="eager")
    state = apply(state, InstanceCreated(instance=chosen, created_at=0.0))
    events, _ = lost_node_events(state, "b", resolve, lambda: "new-1", now=5.0)
    created = events[-1]
    assert isinstance(created, InstanceCreated) and [s.node_id for s in created.instance.shards] == ["a"]
    assert created.instance.intel_gpu_devices == (0,) and created.instance.ipex_optimization_level == "eager"
