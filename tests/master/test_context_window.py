"""The context window of an instance: as asked, else the model's own capped by the memory its nodes have for the KV
cache after the weights; the memory placement counts follows the window chosen."""

from __future__ import annotations

import pytest

from ringlet.master.placement import GIB, InstanceOptions, PlacementError, place, preview, stage_parts
from ringlet.models.catalog import ModelCard, card_from_args
from ringlet.models.config import ModelArgs
from ringlet.shared.config import CPU_CONTEXTS, KV_SHARE, LEAST_CHOSEN_CONTEXT, cache_positions, context_that_fits
from ringlet.shared.engine_info import GpuInfo
from ringlet.shared.instances import InstanceType
from tests.support.node_infos import node_info

KIB = 1024


def test_the_models_own_window_where_the_memory_holds_it() -> None:
    assert context_that_fits(8192, 100 * GIB, 256 * KIB, 0.25) == 8192


def test_the_memory_caps_a_long_window_in_whole_thousands() -> None:
    # a quarter of 10 GiB holds 10240 positions of 256 KiB
    assert context_that_fits(131072, 10 * GIB, 256 * KIB, 0.25) == 10240
    assert context_that_fits(131072, 10 * GIB - 1, 256 * KIB, 0.25) == 9216
    assert context_that_fits(131072, 10 * GIB, 256 * KIB, 0.8) == 32768


def test_never_below_the_least_window_nor_past_the_models() -> None:
    assert context_that_fits(131072, 0, 256 * KIB, 0.25) == LEAST_CHOSEN_CONTEXT
    assert context_that_fits(131072, -5 * GIB, 256 * KIB, 0.8) == LEAST_CHOSEN_CONTEXT, "weights past the memory"
    assert context_that_fits(1024, 0, 256 * KIB, 0.25) == 1024


def long_card(num_layers: int = 16) -> ModelCard:
    args = ModelArgs(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=num_layers,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                     tie_word_embeddings=True)
    return card_from_args("test/long", args, format="safetensors")  # type: ignore[arg-type]


def test_an_instance_given_no_window_takes_what_the_memory_after_the_weights_holds() -> None:
    card = long_card()
    placement = place(card, InstanceType.CPU_RING, [node_info("a", 12)], instance_id="i")
    (stage,) = placement.stages
    per_token = stage_parts(card, 0, card.num_layers, "cpu", 1)[1]
    expected = context_that_fits(card.context_length, stage.usable_bytes - stage.weight_bytes, per_token,
                                 KV_SHARE["cpu"])
    assert LEAST_CHOSEN_CONTEXT < expected < card.context_length, "the memory is what caps it here"
    assert placement.instance.context_length == expected and placement.instance.max_context is None
    positions = placement.instance.kv_cache_tokens
    assert positions == cache_positions(expected, "cpu", 64, stage.usable_bytes - stage.weight_bytes, per_token)
    assert expected <= positions < 2 * expected, "a quarter of the room: about one window, in whole thousands"
    assert stage.kv_bytes == positions * per_token, "the KV cache counted is the one the engines will hold"
    assert stage.fits
    roomier = place(card, InstanceType.CPU_RING, [node_info("a", 24)], instance_id="i")
    assert roomier.instance.context_length is not None and roomier.instance.context_length > expected


def test_an_asked_window_wins_capped_by_the_models() -> None:
    card = long_card()
    short = place(card, InstanceType.CPU_RING, [node_info("a", 12)], instance_id="i",
                  options=InstanceOptions(max_context=4096))
    assert (short.instance.max_context, short.instance.context_length) == (4096, 4096)
    positions = short.instance.kv_cache_tokens
    assert positions is not None and 4096 < positions <= CPU_CONTEXTS * 4096, "a few windows, in a quarter of the room"
    assert short.stages[0].kv_bytes == positions * stage_parts(card, 0, card.num_layers, "cpu", 1)[1]
    with pytest.raises(PlacementError, match="a 131072-token KV cache"):
        place(card, InstanceType.CPU_RING, [node_info("a", 12)], instance_id="i",
              options=InstanceOptions(max_context=1 << 20))


def test_a_gpu_gives_its_cache_a_larger_share_than_the_hosts_memory() -> None:
    card = long_card()
    cpu = place(card, InstanceType.CPU_RING, [node_info("a", 12)], instance_id="i")
    nvidia = GpuInfo(vendor="nvidia", index=0, name="NVIDIA Test", memory_total_bytes=12 * GIB)
    gpu_node = node_info("g", 64, engines=("cuda", "cpu"), gpus=(nvidia,))
    gpu = place(card, InstanceType.CUDA_RING, [gpu_node], instance_id="i")
    assert cpu.instance.context_length is not None and gpu.instance.context_length is not None
    assert gpu.instance.context_length > cpu.instance.context_length


def test_a_rings_window_is_what_its_smallest_room_holds() -> None:
    card = long_card()
    nodes = [node_info("a", 6), node_info("b", 3)]
    placement = place(card, InstanceType.CPU_RING, nodes, instance_id="i", min_nodes=2)
    windows = []
    for stage in placement.stages:
        per_token = stage_parts(card, stage.start, stage.end, "cpu", 1)[1]
        windows.append(context_that_fits(card.context_length, stage.usable_bytes - stage.weight_bytes, per_token,
                                         KV_SHARE["cpu"]))
    assert placement.instance.context_length == min(windows) and len(set(windows)) == 2
    positions = placement.instance.kv_cache_tokens
    assert positions == min(cache_positions(min(windows), "cpu", 64, s.usable_bytes - s.weight_bytes,
                                            stage_parts(card, s.start, s.end, "cpu", 1)[1]) for s in placement.stages)
    assert all(s.kv_bytes == positions * stage_parts(card, s.start, s.end, "cpu", 1)[1] for s in placement.stages), \
        "every stage holds the positions the smallest room holds"
    assert all(s.fits for s in placement.stages)


def test_a_short_window_is_counted_as_the_sequences_the_engine_caches() -> None:
    card = long_card(num_layers=2)
    per_token = stage_parts(card, 0, card.num_layers, "cpu", 1)[1]
    cpu = place(card, InstanceType.CPU_RING, [node_info("a", 64)], instance_id="i",
                options=InstanceOptions(max_context=1024))
    assert cpu.instance.kv_cache_tokens == CPU_CONTEXTS * 1024, "a CPU caches a few windows where they fit"
    assert cpu.stages[0].kv_bytes == CPU_CONTEXTS * 1024 * per_token
    assert cpu.stages[0].memory_bytes == cpu.stages[0].weight_bytes + cpu.stages[0].kv_bytes
    nvidia = GpuInfo(vendor="nvidia", index=0, name="NVIDIA Test", memory_total_bytes=12 * GIB)
    gpu = place(card, InstanceType.CUDA_RING, [node_info("g", 64, engines=("cuda", "cpu"), gpus=(nvidia,))],
                instance_id="i", options=InstanceOptions(max_context=1024))
    (stage,) = gpu.stages
    assert gpu.instance.kv_cache_tokens == cache_positions(1024, "cuda", 64, stage.usable_bytes - stage.weight_bytes,
                                                           stage.kv_bytes // gpu.instance.kv_cache_tokens)
    assert gpu.instance.kv_cache_tokens == 64 * 1024, "a GPU caches a batch of windows where they fit"
    assert stage.fits
    cramped = place(card, InstanceType.CUDA_RING, [node_info("g", 64, engines=("cuda", "cpu"), gpus=(nvidia,))],
                    instance_id="i", options=InstanceOptions(max_context=65536))
    (stage,) = cramped.stages
    assert stage.fits and stage.memory_bytes > 0.8 * stage.usable_bytes, "else most of the room the weights leave"


def test_the_preview_shows_the_window() -> None:
    card = long_card()
    previews = {p.instance_type: p for p in preview(card, [node_info("a", 12)])}
    placed = place(card, InstanceType.CPU_RING, [node_info("a", 12)], instance_id="i")
    assert previews[InstanceType.CPU_RING].context_length == placed.instance.context_length
    asked = {p.instance_type: p for p in preview(card, [node_info("a", 12)], options=InstanceOptions(max_context=3000))}
    assert asked[InstanceType.CPU_RING].context_length == 3000


def test_placed_again_it_chooses_anew() -> None:
    card = long_card()
    first = place(card, InstanceType.CPU_RING, [node_info("a", 24)], instance_id="i")
    again = place(card, InstanceType.CPU_RING, [node_info("b", 12)], instance_id="j",
                  options=InstanceOptions.of(first.instance))
    assert first.instance.context_length is not None and again.instance.context_length is not None
    assert again.instance.context_length < first.instance.context_length and again.stages[0].fits
