"""Placement on Intel GPUs, device by device, and beside the instances a node already has."""

from __future__ import annotations

import pytest

from ringlet.master.placement import (
    GIB,
    USABLE_FRACTION,
    DeviceChoiceError,
    InstanceOptions,
    PlacementError,
    place,
    preview,
    stage_bytes,
)
from ringlet.models.catalog import ModelCard, card_from_args
from ringlet.models.config import ModelArgs
from ringlet.shared.engine_info import GpuInfo
from ringlet.shared.instances import InstanceType
from ringlet.shared.state import InstanceCreated, InstanceRecord, NodeInfo, RunnerReady, State, apply
from tests.support.node_infos import node_info

KV_TOKENS = 1024


def seven_b_card(layers: int = 30) -> ModelCard:
    """About 12 GiB in bf16 with a 1024-token cache: more than an 8 GiB device, less than a 16 GiB one."""
    args = ModelArgs(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    return card_from_args("test/seven-b", args, format="safetensors")  # type: ignore[arg-type]


def gpu(index: int, gib: float, integrated: bool | None = False, name: str = "Intel(R) Arc(TM) A770") -> GpuInfo:
    return GpuInfo(vendor="intel", index=index, name=name, memory_total_bytes=int(gib * GIB),
                   memory_free_bytes=int(gib * GIB), integrated=integrated)


def two_gpu_node(node_id: str = "arc") -> NodeInfo:
    return node_info(node_id, 64, engines=("ipex", "cpu"),
                     gpus=(gpu(0, 8, name="Intel(R) Arc(TM) A750"), gpu(1, 16)))


def test_the_card_is_between_the_two_devices() -> None:
    needed = stage_bytes(seven_b_card(), 0, 30, "ipex", KV_TOKENS)
    assert 8 * GIB * USABLE_FRACTION < needed < 16 * GIB * USABLE_FRACTION
    assert 11 * GIB < needed < 13 * GIB


def test_a_stage_goes_on_the_one_device_it_fits() -> None:
    placement = place(seven_b_card(), InstanceType.IPEX_RING, [two_gpu_node()], instance_id="i", kv_tokens=KV_TOKENS)
    (stage,) = placement.stages
    assert stage.device == 1 and stage.devices == [] and placement.instance.shards[0].devices == (), \
        "on the one device that holds it, not split"
    assert stage.usable_bytes == int(8 * GIB * USABLE_FRACTION) + int(16 * GIB * USABLE_FRACTION)
    assert placement.instance.intel_gpu_devices is None and placement.instance.ipex_optimization_level == "auto"


def test_a_stage_larger_than_the_allowed_device_is_refused_naming_the_devices() -> None:
    options = InstanceOptions(intel_gpu_devices=(0,), ipex_optimization_level="compile")
    with pytest.raises(PlacementError) as refusal:
        place(seven_b_card(), InstanceType.IPEX_RING, [two_gpu_node()], instance_id="i", kv_tokens=KV_TOKENS,
              options=options)
    message = str(refusal.value)
    assert message.startswith("test/seven-b needs 1") and "on Intel GPUs" in message
    assert "split over the devices it may use" in message
    assert "arc: 0 (Intel(R) Arc(TM) A750, discrete, 8.0 GiB free)" in message and "16.0" not in message


def test_a_stage_larger_than_any_device_is_split_over_the_nodes_devices() -> None:
    twins = node_info("twins", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 8), gpu(1, 8)))
    placement = place(seven_b_card(), InstanceType.IPEX_RING, [twins], instance_id="i", kv_tokens=KV_TOKENS)
    (stage,) = placement.stages
    assert [(d.device, d.start, d.end) for d in stage.devices] == [(0, 0, 15), (1, 15, 30)]
    assert all(d.memory_bytes <= d.usable_bytes == int(8 * GIB * USABLE_FRACTION) for d in stage.devices)
    assert stage.device is None
    (shard,) = placement.instance.shards
    assert [(d.device, d.start, d.end) for d in shard.devices] == [(0, 0, 15), (1, 15, 30)]


def test_layers_go_over_devices_in_proportion_to_each_ones_room() -> None:
    uneven = node_info("uneven", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 4), gpu(1, 12)))
    (stage,) = place(seven_b_card(), InstanceType.IPEX_RING, [uneven], instance_id="i", kv_tokens=KV_TOKENS).stages
    [(first, a, b), (second, c, d)] = [(p.device, p.start, p.end) for p in stage.devices]
    assert (first, second, a, d, b) == (0, 1, 0, 30, c) and b - a < d - c, "the smaller device takes fewer layers"
    assert all(p.memory_bytes <= p.usable_bytes for p in stage.devices)


def test_the_fewest_devices_that_hold_the_stage_are_used() -> None:
    four = node_info("four", 64, engines=("ipex", "cpu"), gpus=tuple(gpu(i, 8) for i in range(4)))
    (stage,) = place(seven_b_card(), InstanceType.IPEX_RING, [four], instance_id="i", kv_tokens=KV_TOKENS).stages
    assert [d.device for d in stage.devices] == [0, 1]


def test_devices_that_do_not_hold_the_stage_together_are_refused_naming_them() -> None:
    small = node_info("small", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 4), gpu(1, 4)))
    with pytest.raises(PlacementError, match="0 \\(Intel\\(R\\) Arc\\(TM\\) A770, discrete, 4.0 GiB free\\), 1 "):
        place(seven_b_card(), InstanceType.IPEX_RING, [small], instance_id="i", kv_tokens=KV_TOKENS)
    # with a second such node the model is split over the nodes, and each node's stage over its devices
    other = node_info("small2", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 4), gpu(1, 4)))
    placement = place(seven_b_card(), InstanceType.IPEX_RING, [small, other], instance_id="i", kv_tokens=KV_TOKENS)
    assert [(s.node_id, s.start, s.end, [(d.device, d.start, d.end) for d in s.devices])
            for s in placement.instance.shards] == [("small", 0, 15, [(0, 0, 8), (1, 8, 15)]),
                                                    ("small2", 15, 30, [(0, 15, 23), (1, 23, 30)])]


def test_a_mixed_rings_intel_stage_runs_on_one_device() -> None:
    twins = node_info("twins", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 8), gpu(1, 8)))
    with pytest.raises(PlacementError, match="does not fit a mixed ring"):
        place(seven_b_card(), InstanceType.MIXED_RING, [twins], instance_id="i", kv_tokens=KV_TOKENS)


def test_chosen_devices_are_carried_in_the_instance() -> None:
    options = InstanceOptions(intel_gpu_devices=(1,), ipex_optimization_level="eager")
    placement = place(seven_b_card(), InstanceType.IPEX_RING, [two_gpu_node()], instance_id="i", kv_tokens=KV_TOKENS,
                      options=options)
    assert placement.instance.intel_gpu_devices == (1,) and placement.instance.ipex_optimization_level == "eager"
    assert placement.stages[0].device == 1


def test_a_device_the_node_lacks_is_refused_naming_its_devices() -> None:
    options = InstanceOptions(intel_gpu_devices=(0, 3))
    with pytest.raises(DeviceChoiceError) as refusal:
        place(seven_b_card(), InstanceType.IPEX_RING, [two_gpu_node()], instance_id="i", options=options,
              node_ids=["arc"])
    assert str(refusal.value) == ("node arc has no Intel GPU 3; its Intel GPUs: 0 (Intel(R) Arc(TM) A750, discrete, "
                                  "8.0 GiB free), 1 (Intel(R) Arc(TM) A770, discrete, 16.0 GiB free)")
    # without a node list, a node that has the devices is taken; one without them is left out
    one = node_info("one", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 16),))
    placement = place(seven_b_card(), InstanceType.IPEX_RING, [one, two_gpu_node()], instance_id="i",
                      kv_tokens=KV_TOKENS, options=InstanceOptions(intel_gpu_devices=(1,)))
    assert [s.node_id for s in placement.stages] == ["arc"]


def test_intel_options_on_another_instance_type_are_refused() -> None:
    with pytest.raises(DeviceChoiceError, match="apply to IpexRing instances only, not CpuRing"):
        place(seven_b_card(), InstanceType.CPU_RING, [two_gpu_node()], instance_id="i",
              options=InstanceOptions(ipex_optimization_level="ipex"))


def test_discrete_devices_first_the_integrated_one_where_there_is_no_other() -> None:
    mixed = node_info("laptop", 64, engines=("ipex", "cpu"),
                      gpus=(gpu(0, 30, integrated=True, name="Intel(R) Iris(R) Xe"), gpu(1, 16)))
    stage = place(seven_b_card(), InstanceType.IPEX_RING, [mixed], instance_id="i", kv_tokens=KV_TOKENS).stages[0]
    assert stage.device == 1, "the discrete GPU, though the integrated one reports more memory"
    igpu_only = node_info("nuc", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 30, integrated=True),))
    assert place(seven_b_card(), InstanceType.IPEX_RING, [igpu_only], instance_id="i",
                 kv_tokens=KV_TOKENS).stages[0].device == 0
    chosen = InstanceOptions(intel_gpu_devices=(0,))
    assert place(seven_b_card(), InstanceType.IPEX_RING, [mixed], instance_id="i", kv_tokens=KV_TOKENS,
                 options=chosen).stages[0].device == 0, "asked for by index, the integrated one is used"


def test_preview_gives_the_options_to_ipex_ring_only() -> None:
    options = InstanceOptions(intel_gpu_devices=(0,))
    previews = {p.instance_type: p for p in preview(seven_b_card(), [two_gpu_node()], kv_tokens=KV_TOKENS,
                                                    options=options)}
    assert not previews[InstanceType.IPEX_RING].possible
    assert "8.0 GiB free" in (previews[InstanceType.IPEX_RING].reason or "")
    assert previews[InstanceType.CPU_RING].possible, "the Intel options do not touch the other types"


def records(state: State) -> list[InstanceRecord]:
    return list(state.instances.values())


def test_instances_still_loading_hold_their_memory_and_ready_ones_do_not_count_twice() -> None:
    """A loading runner is not in the node's reported free memory yet, so placement subtracts it; a ready one is
    (the node refreshes its free memory), so placement does not."""
    node = two_gpu_node()
    state = apply(State(), InstanceCreated(instance=place(
        seven_b_card(), InstanceType.IPEX_RING, [node], instance_id="first", kv_tokens=KV_TOKENS).instance,
        memory_bytes={"arc": 12 * GIB}, created_at=0.0))
    with pytest.raises(PlacementError) as refusal:
        place(seven_b_card(), InstanceType.IPEX_RING, [node], instance_id="second", kv_tokens=KV_TOKENS,
              placed=records(state))
    assert "after 12.0 GiB held for its still loading instances: try again once they are loaded" in str(refusal.value)
    ready = apply(state, RunnerReady(instance_id="first", node_id="arc", context_length=4096))
    placed = place(seven_b_card(), InstanceType.IPEX_RING, [node], instance_id="second", kv_tokens=KV_TOKENS,
                   placed=records(ready))
    assert placed.stages[0].usable_bytes == int(8 * GIB * USABLE_FRACTION) + int(16 * GIB * USABLE_FRACTION)


def test_a_loading_stage_split_over_devices_holds_each_ones_share() -> None:
    twins = node_info("twins", 64, engines=("ipex", "cpu"), gpus=(gpu(0, 8), gpu(1, 8)))
    first = place(seven_b_card(), InstanceType.IPEX_RING, [twins], instance_id="first", kv_tokens=KV_TOKENS)
    state = apply(State(), InstanceCreated(instance=first.instance, memory_bytes={"twins": 12 * GIB}, created_at=0.0))
    small = seven_b_card(layers=4)  # about 1.6 GiB: it fits beside the 6 GiB each device holds for the first
    beside = place(small, InstanceType.IPEX_RING, [twins], instance_id="beside", kv_tokens=KV_TOKENS,
                   placed=records(state))
    assert beside.stages[0].usable_bytes == 2 * (int(8 * GIB * USABLE_FRACTION) - 6 * GIB)


def test_a_loading_instance_holds_memory_of_its_own_engine_only() -> None:
    node = two_gpu_node()
    cpu = place(seven_b_card(), InstanceType.CPU_RING, [node], instance_id="cpu", kv_tokens=KV_TOKENS)
    state = apply(State(), InstanceCreated(instance=cpu.instance, memory_bytes={"arc": 20 * GIB}, created_at=0.0))
    on_gpu = place(seven_b_card(), InstanceType.IPEX_RING, [node], instance_id="gpu", kv_tokens=KV_TOKENS,
                   placed=records(state))
    assert on_gpu.stages[0].usable_bytes == int(8 * GIB * USABLE_FRACTION) + int(16 * GIB * USABLE_FRACTION), \
        "RAM held, not the GPUs' memory"
    on_cpu = place(seven_b_card(), InstanceType.CPU_RING, [node], instance_id="cpu2", kv_tokens=KV_TOKENS,
                   placed=records(state))
    assert on_cpu.stages[0].usable_bytes == int(64 * GIB * USABLE_FRACTION) - 20 * GIB
    pinned = place(seven_b_card(), InstanceType.IPEX_RING, [node], instance_id="pinned", kv_tokens=KV_TOKENS,
                   options=InstanceOptions(intel_gpu_devices=(1,)))
    state = apply(state, InstanceCreated(instance=pinned.instance, memory_bytes={"arc": 12 * GIB}, created_at=0.0))
    four_gib = seven_b_card(layers=10)
    beside = place(four_gib, InstanceType.IPEX_RING, [node], instance_id="beside", kv_tokens=KV_TOKENS,
                   placed=records(state))
    assert (beside.stages[0].device, beside.stages[0].usable_bytes) == (
        0, int(8 * GIB * USABLE_FRACTION) + int(16 * GIB * USABLE_FRACTION) - 12 * GIB), \
        "the instance loading on device 1 holds that device only"
