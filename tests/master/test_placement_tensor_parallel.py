"""Placement with tensor parallelism: a CudaRing stage over the first N GPUs of its node (their least free memory,
N times), NVLink or PCIe as the GPUs report it; an IpexRing stage over N Intel GPUs; CPU ranks over loopback; and
the refusals, each with its reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ringlet.master.placement import (
    GIB,
    USABLE_FRACTION,
    DeviceChoiceError,
    InstanceOptions,
    PlacementError,
    place,
    preview,
)
from ringlet.models.catalog import card_from_args, find_card
from ringlet.models.config import ModelArgs
from ringlet.models.random_checkpoint import shape_config
from ringlet.shared.engine_info import GpuInfo
from ringlet.shared.instances import Instance, InstanceType, Shard
from ringlet.shared.state import NodeInfo
from tests.support.node_infos import node_info

SPLIT_IN_2 = InstanceOptions(tensor_parallel=2)


def eight_b():  # type: ignore[no-untyped-def]  32 heads, 8 kv heads
    card = find_card("meta-llama/Llama-3.1-8B-Instruct")
    assert card is not None
    return card


def gpu_node(node_id: str, free_gib: tuple[float, ...], nvlink: bool | None = True) -> NodeInfo:
    gpus = tuple(GpuInfo(vendor="nvidia", index=i, name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 * GIB,
                         memory_free_bytes=int(free * GIB), nvlink=nvlink) for i, free in enumerate(free_gib))
    return node_info(node_id, 64, engines=("cuda", "cpu"), gpus=gpus)


def test_a_cuda_stage_is_split_over_the_first_gpus_of_its_node() -> None:
    node = gpu_node("g", (70, 60, 80, 80))
    placement = place(eight_b(), InstanceType.CUDA_RING, [node], instance_id="i", options=SPLIT_IN_2)
    assert placement.instance.tensor_parallel == 2
    [stage] = placement.stages
    assert (stage.tensor_parallel, stage.link, stage.weight_format) == (2, "NVLink", "bfloat16")
    assert stage.usable_bytes == 2 * int(60 * GIB * USABLE_FRACTION)  # the lesser of GPUs 0 and 1, twice


@pytest.mark.parametrize(("nvlink", "link"), [(False, "PCIe"), (None, "unknown")])
def test_the_link_is_what_the_gpus_report(nvlink: bool | None, link: str) -> None:
    [stage] = place(eight_b(), InstanceType.CUDA_RING, [gpu_node("g", (80, 80), nvlink)], instance_id="i",
                    options=SPLIT_IN_2).stages
    assert stage.link == link


def test_a_node_with_too_few_gpus_is_refused_or_passed_over() -> None:
    one, two = gpu_node("one", (80,)), gpu_node("two", (40, 40))
    with pytest.raises(PlacementError, match="over 2 NVIDIA GPUs of its node: one has 1"):
        place(eight_b(), InstanceType.CUDA_RING, [one], instance_id="i", options=SPLIT_IN_2)
    with pytest.raises(PlacementError, match="one has 1"):  # named: refused
        place(eight_b(), InstanceType.CUDA_RING, [one, two], instance_id="i", node_ids=["one", "two"],
              options=SPLIT_IN_2)
    placement = place(eight_b(), InstanceType.CUDA_RING, [one, two], instance_id="i", options=SPLIT_IN_2)
    assert [s.node_id for s in placement.stages] == ["two"]  # not named: the node that has them


def test_stages_combine_tensor_and_pipeline_parallelism() -> None:
    nodes = [gpu_node("a", (6, 6)), gpu_node("b", (6, 6))]  # 16 GB of bf16 weights fit neither pair alone
    placement = place(eight_b(), InstanceType.CUDA_RING, nodes, instance_id="i", options=SPLIT_IN_2)
    assert [(s.node_id, s.tensor_parallel) for s in placement.stages] == [("a", 2), ("b", 2)]
    assert placement.instance.shards[0].end == placement.instance.shards[1].start


def test_cpu_ranks_hold_fp32_weights_over_loopback() -> None:
    card = card_from_args("test/even", ModelArgs(
        model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048))
    [stage] = place(card, InstanceType.CPU_RING, [node_info("c", 16)], instance_id="i", options=SPLIT_IN_2).stages
    assert (stage.tensor_parallel, stage.link, stage.weight_format) == (2, "loopback", "float32")


def test_what_tensor_parallelism_cannot_split_is_refused_with_the_reason() -> None:
    node = gpu_node("g", (80, 80, 80))
    with pytest.raises(PlacementError, match="32 attention heads do not split over 3"):
        place(eight_b(), InstanceType.CUDA_RING, [node], instance_id="i", options=InstanceOptions(tensor_parallel=3))
    qwen_moe = card_from_args("test/moe", ModelArgs.from_dict(shape_config("qwen3-30b-a3b")))
    with pytest.raises(PlacementError, match="pipeline stages instead"):
        place(qwen_moe, InstanceType.CUDA_RING, [node], instance_id="i", options=SPLIT_IN_2)
    int8 = node.model_copy(update={"precision": "int8"})
    with pytest.raises(PlacementError, match="not int8 .*--precision bf16"):
        place(eight_b(), InstanceType.CUDA_RING, [int8], instance_id="i", options=SPLIT_IN_2)


def intel_node(node_id: str, free_gib: tuple[float, ...]) -> NodeInfo:
    gpus = tuple(GpuInfo(vendor="intel", index=i, name="Intel(R) Data Center GPU Max 1550",
                         memory_total_bytes=64 * GIB, memory_free_bytes=int(free * GIB), integrated=False)
                 for i, free in enumerate(free_gib))
    return node_info(node_id, 64, engines=("ipex", "cpu"), gpus=gpus)


def test_an_ipex_stage_is_split_over_its_nodes_intel_gpus() -> None:
    node = intel_node("x", (60, 50, 64, 64))
    [stage] = place(eight_b(), InstanceType.IPEX_RING, [node], instance_id="i", options=SPLIT_IN_2).stages
    assert (stage.tensor_parallel, stage.link, stage.weight_format) == (2, "unknown", "bfloat16")
    assert stage.usable_bytes == 2 * int(50 * GIB * USABLE_FRACTION)  # devices 0 and 1: the lesser, twice
    assert (stage.devices, stage.device) == ([], None)  # the ranks split every layer; no layers a device

    chosen = InstanceOptions(tensor_parallel=2, intel_gpu_devices=(2, 3, 0))
    placement = place(eight_b(), InstanceType.IPEX_RING, [node], instance_id="i", options=chosen)
    assert placement.stages[0].usable_bytes == 2 * int(64 * GIB * USABLE_FRACTION)  # the first two named: 2 and 3
    assert placement.instance.intel_gpu_devices == (2, 3, 0) and placement.instance.shards[0].devices == ()

    with pytest.raises(PlacementError, match=r"over 2 Intel GPUs \(0, 1\) of its node: one's: 0 \(Intel"):
        place(eight_b(), InstanceType.IPEX_RING, [intel_node("one", (60,))], instance_id="i", options=SPLIT_IN_2)
    with pytest.raises(DeviceChoiceError, match="intel_gpu_devices names 1; name 2 or more"):
        place(eight_b(), InstanceType.IPEX_RING, [node], instance_id="i",
              options=InstanceOptions(tensor_parallel=2, intel_gpu_devices=(1,)))


def test_only_cuda_ipex_and_cpu_rings_take_a_degree() -> None:
    with pytest.raises(DeviceChoiceError, match="applies to CudaRing, IpexRing, CpuRing instances, not MixedRing"):
        place(eight_b(), InstanceType.MIXED_RING, [gpu_node("g", (80, 80))], instance_id="i", options=SPLIT_IN_2)
    shard = Shard(node_id="m", rank=0, start=0, end=32, num_layers=32, engine="mlx")
    with pytest.raises(ValidationError, match="not MlxRing"):
        Instance(instance_id="i", model="m", instance_type=InstanceType.MLX_RING, shards=[shard], tensor_parallel=2)
    with pytest.raises(ValidationError):
        InstanceOptions(tensor_parallel=0)


def test_the_preview_shows_the_split_where_it_applies_and_why_not_elsewhere() -> None:
    previews = {p.instance_type: p for p in preview(eight_b(), [gpu_node("g", (80, 80))], options=SPLIT_IN_2)}
    cuda = previews[InstanceType.CUDA_RING]
    assert cuda.possible and [(s.tensor_parallel, s.link) for s in cuda.stages] == [(2, "NVLink")]
    assert not previews[InstanceType.IPEX_RING].possible
    assert "tensor_parallel applies to" in (previews[InstanceType.MLX_RING].reason or "")
