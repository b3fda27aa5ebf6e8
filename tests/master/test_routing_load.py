"""Requests for one model spread over its ready instances by the tasks each has in flight."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from ringlet.master.routing import route
from ringlet.models.catalog import ModelCard, embedded_card
from ringlet.shared.instances import Instance, InstanceType, Shard
from ringlet.shared.state import InstanceCreated, NodeJoined, RunnerReady, State, TaskRecord, apply
from tests.support.node_infos import node_info

MODEL = embedded_card().id


def resolve(name: str) -> ModelCard:
    assert name == MODEL
    return embedded_card()


def two_ready_instances() -> State:
    state = State()
    for node_id, instance_id in (("a", "i1"), ("b", "i2")):
        state = apply(state, NodeJoined(node=node_info(node_id, 8)))
        instance = Instance(instance_id=instance_id, model=MODEL, instance_type=InstanceType.CPU_RING,
                            shards=[Shard(node_id=node_id, rank=0, start=0, end=30, num_layers=30)])
        state = apply(state, InstanceCreated(instance=instance, created_at=0.0))
        state = apply(state, RunnerReady(instance_id=instance_id, node_id=node_id, context_length=8192))
    return state


def busy_of(tasks: list[TaskRecord]) -> dict[str, int]:
    """What the node hands `route`: its tasks in flight, counted by instance."""
    return dict(Counter(t.instance_id for t in tasks))


def task(n: int, instance_id: str) -> TaskRecord:
    return TaskRecord(task_id=f"t{n}", instance_id=instance_id, model=MODEL, origin_node_id="a", submitted_at=0.0)


def test_the_instance_with_fewer_tasks_in_flight_is_picked() -> None:
    state = two_ready_instances()
    in_flight = [task(0, "i1"), task(1, "i1"), task(2, "i1"), task(3, "i2")]
    assert route(state, MODEL, resolve, "a", True, busy_of(in_flight)).instance.instance_id == "i2"
    in_flight += [task(4, "i2"), task(5, "i2"), task(6, "i2")]
    assert route(state, MODEL, resolve, "a", True, busy_of(in_flight)).instance.instance_id == "i1"


def test_a_run_of_requests_spreads_evenly_over_the_instances() -> None:
    state = two_ready_instances()
    in_flight: list[TaskRecord] = []
    picks = []
    for n in range(10):
        picked = route(state, MODEL, resolve, "a", True, busy_of(in_flight)).instance.instance_id
        picks.append(picked)
        in_flight.append(task(n, picked))
    assert Counter(picks) == {"i1": 5, "i2": 5}
    assert all(a != b for a, b in pairwise(picks)), f"alternates while both are equally loaded: {picks}"
    # the tasks of one instance end: the next requests go to it until the loads are even again
    in_flight = [t for t in in_flight if t.instance_id != "i1"]
    following = []
    for n in range(10, 15):
        picked = route(state, MODEL, resolve, "a", True, busy_of(in_flight)).instance.instance_id
        following.append(picked)
        in_flight.append(task(n, picked))
    assert following == ["i1"] * 5
