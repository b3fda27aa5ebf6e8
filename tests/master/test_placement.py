"""place() and preview(): proportional splits, refusals with reasons, instance-type filtering."""

from __future__ import annotations

from itertools import pairwise

import pytest

from ringlet.master.placement import GIB, InstanceOptions, PlacementError, place, preview, split_layers, stage_bytes
from ringlet.models.catalog import (
    CPU_STORED_INT4,
    CPU_TILES_INT4,
    CPU_TILES_STORED,
    CUDA_INT4,
    WEIGHT_ONLY_INT8,
    XPU_INT4,
    ModelCard,
    card_from_args,
    embedded_card,
    find_card,
)
from ringlet.models.config import ModelArgs
from ringlet.models.kernels import CPU_KERNEL_FLAGS
from ringlet.shared.engine_info import GpuInfo
from ringlet.shared.instances import InstanceType
from ringlet.shared.state import NodeInfo
from tests.support.node_infos import intel_gpu_node, node_info


def small_card(num_layers: int = 30, model_format: str = "safetensors") -> ModelCard:
    args = ModelArgs(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=num_layers,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                     tie_word_embeddings=True)
    return card_from_args("test/small", args, format=model_format)  # type: ignore[arg-type]


def big_card() -> ModelCard:
    card = find_card("Qwen/Qwen3-8B")
    assert card is not None
    return card


def test_split_layers_is_proportional_contiguous_and_complete() -> None:
    assert split_layers(30, [1.0]) == [(0, 30)]
    assert split_layers(30, [1.0, 2.0]) == [(0, 10), (10, 30)]
    ranges = split_layers(30, [1.0, 1.0, 1.0, 1.0])
    assert ranges[0][0] == 0 and ranges[-1][1] == 30 and all(a[1] == b[0] for a, b in pairwise(ranges))
    assert sorted(end - start for start, end in ranges) == [7, 7, 8, 8]
    assert split_layers(3, [100.0, 1.0, 1.0]) == [(0, 1), (1, 2), (2, 3)], "every node gets at least one layer"
    with pytest.raises(PlacementError):
        split_layers(2, [1.0, 1.0, 1.0])


def test_single_node_gets_every_layer() -> None:
    placement = place(small_card(), InstanceType.CPU_RING, [node_info("a", 8)], instance_id="i")
    (shard,) = placement.instance.shards
    assert (shard.node_id, shard.start, shard.end, shard.engine) == ("a", 0, 30, "cpu")
    assert placement.instance.context_length == 8192
    positions = placement.instance.kv_cache_tokens
    assert positions is not None and 8192 < positions <= 8 * 8192, "a CPU caches a few windows in a quarter of its room"
    assert placement.stages[0].memory_bytes == stage_bytes(small_card(), 0, 30, "cpu", positions)


def test_an_instances_context_window_sizes_its_kv_cache_capped_by_the_models() -> None:
    short = place(small_card(), InstanceType.CPU_RING, [node_info("a", 8)], instance_id="i",
                  options=InstanceOptions(max_context=2048))
    assert short.instance.max_context == 2048
    assert short.stages[0].memory_bytes == stage_bytes(small_card(), 0, 30, "cpu", 8 * 2048)
    longer = place(small_card(), InstanceType.CPU_RING, [node_info("a", 8)], instance_id="i",
                   options=InstanceOptions(max_context=65536))
    assert longer.instance.context_length == 8192, "the model's own limit"
    positions = longer.instance.kv_cache_tokens
    assert positions is not None and 8192 < positions <= 8 * 8192
    assert longer.stages[0].memory_bytes == stage_bytes(small_card(), 0, 30, "cpu", positions)
    (cpu,) = [p for p in preview(small_card(), [node_info("a", 8)], options=InstanceOptions(max_context=2048))
              if p.instance_type == InstanceType.CPU_RING]
    assert cpu.stages[0].kv_bytes == short.stages[0].kv_bytes


def test_fewest_nodes_that_fit_most_memory_first() -> None:
    nodes = [node_info("small", 4), node_info("big", 16)]
    placement = place(small_card(), InstanceType.CPU_RING, nodes, instance_id="i")
    assert [s.node_id for s in placement.instance.shards] == ["big"]


def test_min_nodes_splits_in_proportion_to_usable_memory() -> None:
    nodes = [node_info("a", 4), node_info("b", 8)]
    placement = place(small_card(), InstanceType.CPU_RING, nodes, instance_id="i", min_nodes=2)
    assert [(s.node_id, s.start, s.end) for s in placement.instance.shards] == [("b", 0, 20), ("a", 20, 30)]


def test_explicit_node_list_keeps_its_order() -> None:
    nodes = [node_info("a", 4), node_info("b", 8, name="bee")]
    placement = place(small_card(), InstanceType.CPU_RING, nodes, instance_id="i", node_ids=["a", "bee"])
    assert [(s.node_id, s.start, s.end) for s in placement.instance.shards] == [("a", 0, 10), ("b", 10, 30)]


def test_ipex_ring_needs_an_intel_gpu() -> None:
    with pytest.raises(PlacementError) as refusal:
        place(small_card(), InstanceType.IPEX_RING, [node_info("a", 8)], instance_id="i")
    assert str(refusal.value).startswith("IpexRing needs a node with an Intel GPU; none of the 1 node has one")
    assert "no Intel GPU found" in str(refusal.value)
    intel = intel_gpu_node("arc", free_gib=8, gpu_gib=16)
    placement = place(small_card(), InstanceType.IPEX_RING, [node_info("a", 8), intel], instance_id="i")
    assert [(s.node_id, s.engine) for s in placement.instance.shards] == [("arc", "ipex")]
    assert placement.stages[0].usable_bytes == int(16 * GIB * 0.9), "placed by GPU memory, not RAM"


def test_too_big_a_model_is_refused_with_sizes() -> None:
    with pytest.raises(PlacementError) as refusal:
        place(big_card(), InstanceType.CPU_RING, [node_info("a", 8), node_info("b", 8)], instance_id="i")
    message = str(refusal.value)
    assert message.startswith("Qwen/Qwen3-8B needs ") and "GiB" in message
    assert "the 2 suitable nodes have 14.4 GiB usable" in message


def test_the_model_is_split_when_one_node_is_too_small() -> None:
    card = big_card()
    need = stage_bytes(card, 0, card.num_layers, "cpu", 8192) / GIB
    nodes = [node_info("a", need * 0.7), node_info("b", need * 0.7)]
    placement = place(card, InstanceType.CPU_RING, nodes, instance_id="i")
    assert len(placement.instance.shards) == 2
    assert all(s.memory_bytes <= s.usable_bytes for s in placement.stages)


def test_other_refusals_name_the_problem() -> None:
    nodes = [node_info("a", 8)]
    with pytest.raises(PlacementError, match="unknown node"):
        place(small_card(), InstanceType.CPU_RING, nodes, instance_id="i", node_ids=["zzz"])
    with pytest.raises(PlacementError, match="at least 2 nodes but only 1"):
        place(small_card(), InstanceType.CPU_RING, nodes, instance_id="i", min_nodes=2)
    with pytest.raises(PlacementError, match="cannot run as MlxRing"):
        cpu_only = small_card().model_copy(update={"instance_types": [InstanceType.CPU_RING]})
        place(cpu_only, InstanceType.MLX_RING, [node_info("m", 8, engines=("mlx", "cpu"))], instance_id="i")
    with pytest.raises(PlacementError, match="no nodes"):
        place(small_card(), InstanceType.CPU_RING, [], instance_id="i")


def test_preview_covers_every_instance_type() -> None:
    previews = {p.instance_type: p for p in preview(small_card(), [node_info("a", 8)])}
    assert set(previews) == set(InstanceType)
    assert previews[InstanceType.CPU_RING].possible and previews[InstanceType.CPU_RING].stages[0].end == 30
    for impossible in (InstanceType.IPEX_RING, InstanceType.CUDA_RING, InstanceType.MLX_RING, InstanceType.MLX_JACCL):
        assert not previews[impossible].possible and previews[impossible].reason
    assert "Intel GPU" in (previews[InstanceType.IPEX_RING].reason or "")


def test_mlx_jaccl_needs_macs_even_where_mlx_runs() -> None:
    linux = node_info("l", 8, engines=("mlx", "cpu"), name="pc")
    with pytest.raises(PlacementError, match="pc: MLX Jaccl needs macOS"):
        place(small_card(), InstanceType.MLX_JACCL, [linux], instance_id="i")
    assert place(small_card(), InstanceType.MLX_RING, [linux], instance_id="i").instance.shards[0].engine == "mlx"
    mac = linux.model_copy(update={"hardware": linux.hardware.model_copy(update={"system": "Darwin"})})
    assert place(small_card(), InstanceType.MLX_JACCL, [mac], instance_id="i").instance.shards[0].engine == "mlx"


def test_mixed_ring_runs_each_stage_on_its_nodes_engine() -> None:
    nodes = [node_info("mac", 12, engines=("mlx", "cpu")), node_info("pc", 6, engines=("cpu",))]
    placement = place(small_card(model_format="gguf"), InstanceType.MIXED_RING, nodes, instance_id="i",
                      node_ids=["mac", "pc"])
    assert placement.instance.instance_type == InstanceType.MIXED_RING
    shards = [(s.node_id, s.engine, s.start, s.end) for s in placement.instance.shards]
    assert shards == [("mac", "mlx", 0, 20), ("pc", "cpu", 20, 30)], "engines per node, layers by memory"
    assert [s.engine for s in placement.stages] == ["mlx", "cpu"]
    # MLX without Metal computes in float32, as the CPU engine does
    assert placement.stages[0].memory_bytes == stage_bytes(small_card(), 0, 20, "cpu", 8192)


def test_mixed_ring_memory_counts_each_nodes_own_engine() -> None:
    intel = intel_gpu_node("arc", free_gib=2, gpu_gib=24)
    nodes = [node_info("a", 8), intel]
    placement = place(small_card(), InstanceType.MIXED_RING, nodes, instance_id="i", min_nodes=2)
    assert [(s.node_id, s.engine) for s in placement.instance.shards] == [("arc", "ipex"), ("a", "cpu")]
    assert placement.stages[0].usable_bytes == int(24 * GIB * 0.9), "the Intel GPU's memory, not the host's RAM"
    assert [(s.start, s.end) for s in placement.instance.shards] == [(0, 22), (22, 30)]


def test_mixed_ring_refusals_name_nodes_and_engines() -> None:
    nodes = [node_info("mac", 3, engines=("mlx", "cpu")), node_info("pc", 3, engines=("cpu",))]
    with pytest.raises(PlacementError) as refusal:
        place(big_card(), InstanceType.MIXED_RING, nodes, instance_id="i")
    message = str(refusal.value)
    assert message.startswith("Qwen/Qwen3-8B does not fit a mixed ring of the 2 suitable nodes")
    assert "mac (mlx, layers 0-" in message and "pc (cpu, layers " in message and "has 2.7" in message
    engineless = node_info("bare", 8, engines=())
    with pytest.raises(PlacementError) as refusal:
        place(small_card(), InstanceType.MIXED_RING, [engineless], instance_id="i")
    assert str(refusal.value).startswith("MixedRing needs a node with an engine of its own")
    assert "bare: no engine is available (ipex: no Intel GPU found" in str(refusal.value)


def test_placement_of_the_embedded_model_over_three_nodes() -> None:
    card = embedded_card()
    nodes = [node_info("a", 8.0), node_info("b", 8.0), node_info("c", 16.0)]
    placement = place(card, InstanceType.CPU_RING, nodes, instance_id="x", node_ids=["a", "b", "c"])
    assert [(s.start, s.end) for s in placement.instance.shards] == [(0, 8), (8, 16), (16, 30)]
    with pytest.raises(PlacementError, match="IpexRing needs a node with an Intel GPU; none of the 3 nodes"):
        place(card, InstanceType.IPEX_RING, nodes, instance_id="x")


def test_a_cpu_that_quantises_is_counted_at_a_byte_a_weight() -> None:
    card = big_card()
    quantised = card.weight_bytes("int8")
    layers = card.num_layers * card.layer_parameters
    # an int8 embedding, and an int8 head of its own unless tied (then the embedding's codes are the head's)
    ends = card.embedding_parameters * (1 if card.tie_word_embeddings else 2)
    assert quantised == pytest.approx(layers + ends, rel=1e-3)
    assert quantised < 0.55 * card.weight_bytes("bfloat16")
    assert card.kv_cache_bytes_per_token("int8") == card.kv_cache_bytes_per_token("bfloat16")

    plain, bf16_cpu = node_info("plain", 14), node_info("bf16", 14)
    bf16_cpu.hardware.cpu.flags.append("avx512_bf16")
    with pytest.raises(PlacementError, match=r"needs .* GiB on cpu \(float32 weights"):
        place(card, InstanceType.CPU_RING, [plain], instance_id="i")  # fp32 there: four bytes a weight
    placement = place(card, InstanceType.CPU_RING, [bf16_cpu], instance_id="i", kv_tokens=8192)
    [stage] = placement.stages
    positions = placement.instance.kv_cache_tokens
    assert positions is not None and 8192 <= positions < 2 * 8192, "a quarter of the room the weights leave"
    assert stage.memory_bytes == stage_bytes(card, 0, card.num_layers, "cpu", positions, "int8") <= stage.usable_bytes


def q4_k_m_like_8b() -> ModelCard:
    """Llama 3.1 8B as a Q4_K_M GGUF file: most linears in 4-bit groups, attn_v and ffn_down of half the layers in
    Q6_K (so their fused q/k/v and their down projection run as int8)."""
    card = find_card("meta-llama/Llama-3.1-8B-Instruct")
    assert card is not None
    return card.model_copy(update={"format": "gguf", "four_bit_share": 0.72})


def nvidia_node(node_id: str, gpu_gib: float) -> NodeInfo:
    gpu = GpuInfo(vendor="nvidia", index=0, name="NVIDIA Test", memory_total_bytes=int(gpu_gib * GIB))
    return node_info(node_id, 64, engines=("cuda", "cpu"), gpus=(gpu,))


def test_a_cpu_with_ringlets_kernels_is_counted_holding_a_files_5_bit_groups() -> None:
    """A GGUF file whose hidden size is not whole K-quant blocks (llama.cpp's Q4_K_M keeps such linears in Q5_0): on a
    CPU with AVX-512 VNNI they stay 5-bit codes (0.75 B a weight), elsewhere int8 rows (1 B and a scale a row)."""
    card = q4_k_m_like_8b().model_copy(update={"four_bit_share": 0.2, "five_bit_share": 0.6})
    plain, tiles = node_info("avx512", 64), node_info("vnni", 64)
    for node in (plain, tiles):
        node.hardware.cpu.flags.append("avx512_bf16")
    tiles.hardware.cpu.flags.extend(CPU_KERNEL_FLAGS)
    [held_int8] = place(card, InstanceType.CPU_RING, [plain], instance_id="i").stages
    [held_five] = place(card, InstanceType.CPU_RING, [tiles], instance_id="i").stages
    assert (held_int8.weight_format, held_five.weight_format) == (CPU_STORED_INT4, CPU_TILES_STORED)
    linears = card.num_layers * (card.layer_linear_parameters or 0)
    # each 5-bit weight: 0.75 B where int8 takes 1 B and a bf16 scale a row of `hidden` weights
    saved = 0.6 * linears * (1 + 2 / card.hidden_size - 0.75)
    assert held_int8.weight_bytes - held_five.weight_bytes == pytest.approx(saved, rel=1e-3)
    [asked_int4] = place(card, InstanceType.CPU_RING, [tiles], instance_id="i", precision="int4").stages
    assert asked_int4.weight_format == CPU_TILES_INT4
    assert asked_int4.weight_bytes - card.weight_bytes(XPU_INT4) == pytest.approx(0.6 * linears * (0.75 - 0.625),
                                                                                  rel=1e-3)


def test_an_8b_q4_k_m_file_is_counted_as_each_engine_holds_it() -> None:
    card = q4_k_m_like_8b()
    linears = card.num_layers * (card.layer_linear_parameters or 0)
    # the CPU with native bf16: the file's groups as int4 (codes and bf16 scale/zero per 32: 0.625 B), the rest int8
    # (a byte and a bf16 scale per output row), the embedding and the lm_head int8 (a float32 step, a bf16 scale a
    # row), the norms in bf16
    cpu_bytes = card.weight_bytes(CPU_STORED_INT4)
    expected = linears * (0.72 * 0.625 + 0.28) + card.embedding_parameters * (1 + 1) + card.vocab_size * (4 + 2)
    assert cpu_bytes == pytest.approx(expected, rel=2e-3)
    assert 5.4 * GIB < cpu_bytes < 5.9 * GIB < card.weight_bytes("bfloat16") / 2.5
    # int8 asked for rounds the file's 4-bit groups to int8 rows as well
    assert card.weight_bytes(WEIGHT_ONLY_INT8) == pytest.approx(
        linears * (1 + 2 / card.hidden_size) + card.embedding_parameters * (1 + 1) + card.vocab_size * (4 + 2),
        rel=2e-3)
    # CUDA's int4 rounds every linear in groups of 128 (fp16 scale/zero: 0.53 B) and the embedding in groups of 32
    # (0.625 B), the lm_head int8; an Intel GPU's linears in groups of 32, its embedding int8
    assert card.weight_bytes(CUDA_INT4) < card.weight_bytes(XPU_INT4) < cpu_bytes
    assert card.weight_bytes(CUDA_INT4) == pytest.approx(
        linears * (0.5 + 4 / 128) + card.embedding_parameters * (0.625 + 1), rel=2e-3)
    assert card.kv_cache_bytes_per_token(WEIGHT_ONLY_INT8) == card.kv_cache_bytes_per_token("bfloat16")
    assert card.kv_cache_bytes_per_token("float32") == 2 * card.kv_cache_bytes_per_token("bfloat16")

    bf16_cpu, plain_cpu = node_info("bf16", 8.5), node_info("plain", 16)
    bf16_cpu.hardware.cpu.flags.append("amx_bf16")
    eight_k = InstanceOptions(max_context=8192)
    [stage] = place(card, InstanceType.CPU_RING, [bf16_cpu], instance_id="i", options=eight_k).stages
    assert (stage.weight_format, stage.weight_bytes) == (CPU_STORED_INT4, cpu_bytes)
    assert stage.kv_bytes == 8192 * card.kv_cache_bytes_per_token("bfloat16")  # bf16 cache for the 8192 positions
    assert stage.memory_bytes == stage.weight_bytes + stage.kv_bytes <= stage.usable_bytes
    with pytest.raises(PlacementError, match=r"needs 31\.9 GiB on cpu \(float32 weights"):
        place(card, InstanceType.CPU_RING, [plain_cpu], instance_id="i", options=eight_k)  # fp32, twice the cache

    gpu = nvidia_node("gpu", 12)  # bf16 by default: 15 GiB of weights do not fit; int4 asked for does
    with pytest.raises(PlacementError, match=r"on cuda \(bfloat16 weights"):
        place(card, InstanceType.CUDA_RING, [gpu], instance_id="i")
    [stage] = place(card, InstanceType.CUDA_RING, [gpu], instance_id="i", precision="int4").stages
    assert stage.weight_format == CUDA_INT4 and stage.weight_bytes < 5 * GIB
    # a node started with --precision int4 is counted at what it will load, unasked
    int4_gpu = gpu.model_copy(update={"precision": "int4"})
    [stage] = place(card, InstanceType.CUDA_RING, [int4_gpu], instance_id="i").stages
    assert stage.weight_format == CUDA_INT4

    arc = intel_gpu_node("arc", 64, 8)  # an 8 GiB Intel GPU: int4 in groups of 32 fits, bf16 does not
    with pytest.raises(PlacementError, match=r"on Intel GPUs \(bfloat16 weights"):
        place(card, InstanceType.IPEX_RING, [arc], instance_id="i")
    [stage] = place(card, InstanceType.IPEX_RING, [arc], instance_id="i", precision="int4").stages
    assert stage.weight_format == XPU_INT4 and stage.memory_bytes <= stage.usable_bytes
