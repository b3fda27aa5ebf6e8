"""The supervisor's plan: which runners this node starts and stops for a state (a pure function)."""

from __future__ import annotations

from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import Instance, Shard
from ringlet.shared.state import (
    InstanceCreated,
    NodeJoined,
    NodeLeft,
    RingAddress,
    RingHosted,
    RunnerStatus,
    State,
    apply,
)
from ringlet.worker.supervisor import plan
from tests.support.node_infos import node_info


def with_two_stage_instance() -> State:
    instance = Instance(instance_id="inst-1", model="m", instance_type="CpuRing", shards=[
        Shard(node_id="a", rank=0, start=0, end=15, num_layers=30),
        Shard(node_id="b", rank=1, start=15, end=30, num_layers=30)])
    state = State()
    for n in ("a", "b"):
        state = apply(state, NodeJoined(node=node_info(n, 8.0)))
    return apply(state, InstanceCreated(instance=instance, created_at=0.0))


def test_an_instances_context_window_reaches_its_runners_config() -> None:
    instance = Instance(instance_id="inst-2", model="m", instance_type="CpuRing", max_context=32768,
                        shards=[Shard(node_id="a", rank=0, start=0, end=30, num_layers=30)])
    state = apply(apply(State(), NodeJoined(node=node_info("a", 8.0))), InstanceCreated(instance=instance,
                                                                                     created_at=0.0))
    (load,), _ = plan(state, "a", [], config=EngineConfig(precision="fp32"))
    assert load.config == EngineConfig(precision="fp32", max_context=32768)
    (plain,), _ = plan(with_two_stage_instance(), "a", [], config=EngineConfig(precision="fp32"))
    assert plain.config == EngineConfig(precision="fp32")


def test_the_context_window_placement_chose_reaches_its_runners_config() -> None:
    instance = Instance(instance_id="inst-3", model="m", instance_type="CpuRing", context_length=20480,
                        shards=[Shard(node_id="a", rank=0, start=0, end=30, num_layers=30)])
    state = apply(apply(State(), NodeJoined(node=node_info("a", 8.0))), InstanceCreated(instance=instance,
                                                                                     created_at=0.0))
    (load,), _ = plan(state, "a", [], config=EngineConfig(precision="fp32"))
    assert load.config == EngineConfig(precision="fp32", max_context=20480)


def test_the_kv_cache_placement_counted_reaches_its_runners_config() -> None:
    instance = Instance(instance_id="inst-4", model="m", instance_type="CpuRing", context_length=4096,
                        kv_cache_tokens=32768, shards=[Shard(node_id="a", rank=0, start=0, end=30, num_layers=30)])
    state = apply(apply(State(), NodeJoined(node=node_info("a", 8.0))), InstanceCreated(instance=instance,
                                                                                     created_at=0.0))
    (load,), _ = plan(state, "a", [], config=EngineConfig(precision="fp32"))
    assert load.config == EngineConfig(precision="fp32", max_context=4096, kv_cache_plan=32768)


def test_later_stage_starts_only_once_the_ring_is_hosted() -> None:
    state = with_two_stage_instance()
    start_a, _ = plan(state, "a", [])
    start_b, _ = plan(state, "b", [])
    assert [s.bound.shard.rank for s in start_a] == [0] and start_b == []
    state = apply(state, RingHosted(instance_id="inst-1", address=RingAddress(host="10.0.0.1", port=4000)))
    start_b, _ = plan(state, "b", [], data_host="10.0.0.2")
    assert start_b[0].ring == RingAddress(host="10.0.0.1", port=4000) and start_b[0].data_host == "10.0.0.2"


def test_the_node_engine_config_goes_into_every_load() -> None:
    config = EngineConfig(precision="fp32", max_context=1024, cpu_compile=False)
    start, _ = plan(with_two_stage_instance(), "a", [], config=config)
    assert [load.config for load in start] == [config]


def test_a_node_leaving_stops_the_other_stages_and_does_not_restart_them() -> None:
    state = apply(with_two_stage_instance(), NodeLeft(node_id="b"))
    assert state.instances["inst-1"].runners["b"].status == RunnerStatus.FAILED
    start, stop = plan(state, "a", ["inst-1"])
    assert stop == ["inst-1"] and start == []
    assert plan(state, "a", []) == ([], [])
