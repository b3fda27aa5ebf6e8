"""apply() of what a runner reports about its engine: what it runs on, what it applied, and a fallback."""

from __future__ import annotations

from ringlet.shared.instances import Instance, InstanceType, Shard
from ringlet.shared.state import (
    InstanceCreated,
    RunnerFailed,
    RunnerFellBack,
    RunnerReady,
    RunnerStatus,
    State,
    apply,
)

OPTIMIZATION = "ipex.optimize (bf16): 211 of 211 linear layers prepacked"


def ipex_state() -> State:
    instance = Instance(instance_id="inst-1", model="m", instance_type=InstanceType.IPEX_RING,
                        shards=[Shard(node_id="a", rank=0, start=0, end=20, num_layers=20, engine="ipex")],
                        intel_gpu_devices=(1,), ipex_optimization_level="ipex")
    return apply(State(), InstanceCreated(instance=instance, created_at=0.0))


def test_ready_records_the_engine_and_what_was_applied() -> None:
    state = apply(ipex_state(), RunnerReady(instance_id="inst-1", node_id="a", context_length=4096, engine="ipex",
                                            optimization=OPTIMIZATION))
    runner = state.instances["inst-1"].runners["a"]
    assert (runner.status, runner.engine, runner.optimization, runner.fallback) == (
        RunnerStatus.READY, "ipex", OPTIMIZATION, None)
    assert state.instances["inst-1"].instance.intel_gpu_devices == (1,)


def test_a_fallback_at_load_arrives_with_ready() -> None:
    state = apply(ipex_state(), RunnerReady(instance_id="inst-1", node_id="a", context_length=4096, engine="cpu",
                                            fallback="ipex -> cpu: no Level Zero driver"))
    runner = state.instances["inst-1"].runners["a"]
    assert (runner.engine, runner.fallback, runner.optimization) == ("cpu", "ipex -> cpu: no Level Zero driver", None)


def test_a_fallback_while_serving_keeps_the_runner_ready_and_its_optimisation() -> None:
    state = apply(ipex_state(), RunnerReady(instance_id="inst-1", node_id="a", context_length=4096, engine="ipex",
                                            optimization=OPTIMIZATION))
    state = apply(state, RunnerFellBack(instance_id="inst-1", node_id="a", engine="cpu",
                                        reason="ipex -> cpu: the device was lost"))
    record = state.instances["inst-1"]
    runner = record.runners["a"]
    assert (runner.status, runner.engine, runner.fallback) == (RunnerStatus.READY, "cpu", "ipex -> cpu: the device was lost")
    assert runner.optimization == OPTIMIZATION and record.status == RunnerStatus.READY


def test_a_fallback_of_an_unknown_or_failed_runner_changes_nothing() -> None:
    state = ipex_state()
    unknown = apply(state, RunnerFellBack(instance_id="inst-9", node_id="a", engine="cpu", reason="r"))
    assert unknown.instances == state.instances and unknown.last_event == state.last_event + 1
    failed = apply(state, RunnerFailed(instance_id="inst-1", node_id="a", error="crashed"))
    after = apply(failed, RunnerFellBack(instance_id="inst-1", node_id="a", engine="cpu", reason="r"))
    assert after.instances["inst-1"].runners["a"].fallback is None
    assert after.instances["inst-1"].runners["a"].status == RunnerStatus.FAILED
