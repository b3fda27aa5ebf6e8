"""GGML block types decoded in torch (`gguf_quants`) against gguf.quants' numpy decoders, bit for bit; small models
whose linears are in each type against the same model built from gguf.quants' values; the on-disk repack cache."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load, load_file, save

from ringlet.models import gguf_loader, gguf_quants
from ringlet.models.catalog import CPU_STORED_INT4, CPU_TILES_STORED, card_from_path
from ringlet.models.kernels import cpu_vnni
from ringlet.models.loader import load_stage
from ringlet.models.quant import Int4Linear, Int8Linear, cpu_supports_bf16
from ringlet.models.registry import build_stage
from tests.support.gguf_models import (
    DECODED,
    HEADS,
    HIDDEN,
    INTER,
    KV_HEADS,
    LAYERS,
    LINEARS,
    TOLERANCE,
    VOCAB,
    blocks_of,
    logits,
    reference,
    relative_error,
    write_model,
)


@pytest.mark.parametrize("qtype", [*DECODED, Q.Q3_K])
def test_blocks_decode_bit_identical_to_gguf_quants_over_several_runs(qtype: Q,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    raw = blocks_of(qtype, 64 * 256)
    expected = reference(raw, qtype)
    monkeypatch.setattr(gguf_quants, "RUN_VALUES", 700)  # a few rows a run: the runs must join up
    got = gguf_quants.dequantize(raw, qtype, (64, 256))
    assert got.dtype == torch.float32 and got.shape == (64, 256)
    assert np.array_equal(got.reshape(-1).numpy(), expected)
    in_bf16 = gguf_quants.dequantize(raw, qtype, (64, 256), torch.bfloat16)
    assert torch.equal(in_bf16, torch.from_numpy(expected).view(64, 256).bfloat16())


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_float_types_come_through_unchanged(qtype: Q) -> None:
    values = np.random.default_rng(2).standard_normal((8, 96), dtype=np.float32)
    stored = {Q.F32: values, Q.F16: values.astype(np.float16), Q.BF16: gguf.quants.quantize(values, Q.BF16)}[qtype]
    expected = values if qtype == Q.F32 else gguf.quants.dequantize(stored, qtype) if qtype == Q.BF16 else \
        stored.astype(np.float32)
    assert np.array_equal(gguf_quants.dequantize(stored, qtype, (8, 96)).numpy(), expected)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K])
def test_4_and_5_bit_types_are_their_own_codes_and_groups_of_32(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = blocks_of(qtype, 32 * 256, seed=3)
    monkeypatch.setattr(gguf_quants, "RUN_VALUES", 1000)
    groups = gguf_quants.decode_groups(raw, qtype, (32, 256))
    bits = 5 if qtype in gguf_quants.GROUPED5_TYPES else 4
    assert groups.codes.dtype == torch.uint8 and groups.codes.shape == (32, 256) and groups.bits == bits
    assert int(groups.codes.max()) == (1 << bits) - 1 and groups.group_size == 32
    assert groups.scale.shape == groups.offset.shape == (32, 8) and groups.scale.dtype == torch.float32
    expected = torch.from_numpy(reference(raw, qtype)).view(32, 256)
    assert torch.equal(groups.dequantize(), expected)
    assert torch.equal(gguf_quants.dequantize_groups(groups, torch.bfloat16), expected.bfloat16())
    if qtype == Q.Q4_0:
        assert torch.equal(groups.offset, -8 * groups.scale)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RINGLET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RINGLET_GGUF_CACHE", raising=False)
    return tmp_path / "home"


@pytest.mark.skipif(not cpu_supports_bf16(), reason="int4 runs with bf16 activations (AVX-512 BF16/AMX)")
@pytest.mark.parametrize("qtype", DECODED)
@pytest.mark.usefixtures("pytorch_cpu_kernels")
def test_a_model_in_each_type_gives_the_logits_of_gguf_quants_values(qtype: Q, tmp_path: Path, home: Path) -> None:
    path = tmp_path / f"{qtype.name}.gguf"
    weights = write_model(path, dict.fromkeys(LINEARS, qtype))
    stage = load_stage(path)
    want = logits(build_stage(stage.args, weights=weights))
    assert torch.equal(logits(stage.model), want)  # fp32: the very same weights
    quantised = load_stage(path, quantize="int4 where stored", dtype=torch.bfloat16)
    assert quantised.quantized == ("int4" if qtype in gguf_quants.GROUPED_TYPES else "int8")
    assert relative_error(logits(quantised.model), want) < TOLERANCE[qtype]


def test_other_types_go_through_gguf_quants_with_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q3_k.gguf"
    weights = write_model(path, {**dict.fromkeys(LINEARS, Q.Q6_K), "ffn_up": Q.Q3_K, "ffn_gate": Q.Q2_K})
    with caplog.at_level("INFO", logger="ringlet.models.gguf_loader"):
        stage = load_stage(path)
    [line] = [r.getMessage() for r in caplog.records if "gguf.quants" in r.getMessage()]
    assert line == "q3_k.gguf: tensors stored as Q2_K (2), Q3_K (2) are decoded by gguf.quants (numpy, slower)"
    assert torch.equal(logits(stage.model), logits(build_stage(stage.args, weights=weights)))


# ---- the repack cache ------------------------------------------------------------------------------------------------

MIXED = {**dict.fromkeys(LINEARS, Q.Q4_K), "attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "attn_output": Q.Q4_0}


class Decodes:
    """Counts the file decoding the loader does: groups, and values of the types kept as groups (4- and 5-bit)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.groups: list[Q] = []
        self.grouped_values: list[Q] = []
        decode_groups, dequantize = gguf_loader.decode_groups, gguf_loader.dequantize

        def count_groups(data, qtype, shape):  # type: ignore[no-untyped-def]
            self.groups.append(qtype)
            return decode_groups(data, qtype, shape)

        def count_values(data, qtype, *args, **kwargs):  # type: ignore[no-untyped-def]
            if qtype in gguf_quants.GROUPED_TYPES | gguf_quants.GROUPED5_TYPES:
                self.grouped_values.append(qtype)
            return dequantize(data, qtype, *args, **kwargs)

        monkeypatch.setattr(gguf_loader, "decode_groups", count_groups)
        monkeypatch.setattr(gguf_loader, "dequantize", count_values)

    def reset(self) -> None:
        self.groups.clear()
        self.grouped_values.clear()


def load_int4(path: Path) -> torch.Tensor:
    return logits(load_stage(path, quantize="int4 where stored", dtype=torch.bfloat16).model)


def entries(home: Path) -> list[Path]:
    return sorted((home / "cache" / "gguf").glob("*/*.safetensors"))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Decodes]:
    yield Decodes(monkeypatch)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="int4 runs with bf16 activations (AVX-512 BF16/AMX)")
def test_a_second_load_reads_the_groups_from_the_cache(tmp_path: Path, home: Path, decodes: Decodes) -> None:
    path = tmp_path / "mixed.gguf"
    write_model(path, MIXED)
    first = load_int4(path)
    assert decodes.groups.count(Q.Q4_K) == 4 * LAYERS and decodes.groups.count(Q.Q4_0) == LAYERS
    assert not decodes.grouped_values  # the layers' float weights came from the same groups
    assert [p.name for p in entries(home)] == [f"blk.{i}.safetensors" for i in range(LAYERS)]

    decodes.reset()
    assert torch.equal(load_int4(path), first)
    assert not decodes.groups and not decodes.grouped_values

    decodes.reset()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: every entry is stale
    assert torch.equal(load_int4(path), first)
    assert len(decodes.groups) == 5 * LAYERS
    decodes.reset()
    load_int4(path)
    assert not decodes.groups


@pytest.mark.skipif(not cpu_supports_bf16(), reason="int4 runs with bf16 activations (AVX-512 BF16/AMX)")
@pytest.mark.parametrize("damage", ["truncated", "garbage", "other tensors", "scales not finite", "a flipped bit"])
def test_a_corrupt_entry_is_decoded_again_and_rewritten(tmp_path: Path, home: Path, decodes: Decodes,
                                                        damage: str) -> None:
    path = tmp_path / "mixed.gguf"
    write_model(path, MIXED)
    first = load_int4(path)
    entry = entries(home)[1]
    data = entry.read_bytes()
    if damage == "other tensors":  # a readable entry made for another file: the stage's first layer's
        entry.write_bytes(entries(home)[0].read_bytes())
    elif damage == "scales not finite":  # the right tensors, a scale's bytes overwritten (0xFF: a NaN)
        tensors = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        scale = next(k for k in tensors if k.endswith(".scale"))
        tensors[scale] = torch.full_like(tensors[scale], float("nan"))
        entry.write_bytes(save(tensors, metadata=header["__metadata__"]))
    elif damage == "a flipped bit":  # a well-formed entry whose last tensor's last byte changed on disk
        entry.write_bytes(data[:-1] + bytes([data[-1] ^ 0x04]))
    else:
        entry.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x10" * 64)
    decodes.reset()
    assert torch.equal(load_int4(path), first)
    assert len(decodes.groups) == 5  # layer 1's, only
    rewritten, written = load_file(entry), load(data)  # the same tensors again (in whatever order)
    assert rewritten.keys() == written.keys() and all(torch.equal(rewritten[k], written[k]) for k in written)
    decodes.reset()
    load_int4(path)
    assert not decodes.groups


@pytest.mark.skipif(not cpu_supports_bf16(), reason="int4 runs with bf16 activations (AVX-512 BF16/AMX)")
def test_a_cache_that_cannot_be_written_or_is_off_only_costs_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decodes: Decodes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mixed.gguf"
    write_model(path, MIXED)
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache's directory would be")
    monkeypatch.setenv("RINGLET_HOME", str(blocker))
    with caplog.at_level(logging.INFO, logger="ringlet.models.repack_cache"):
        first = load_int4(path)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("cannot write the GGUF repack cache in ") and line.endswith("; loading without it")

    monkeypatch.setenv("RINGLET_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("RINGLET_GGUF_CACHE", "0")
    decodes.reset()
    assert torch.equal(load_int4(path), first)
    assert len(decodes.groups) == 5 * LAYERS
    assert not (tmp_path / "other").exists()


# ---- 5-bit codes on CPUs with ringlet's kernels ----------------------------------------------------------------------

FIVE_BIT = [Q.Q5_0, Q.Q5_1, Q.Q5_K]
needs_vnni = pytest.mark.skipif(not cpu_vnni.available(), reason="5-bit codes run on ringlet's AVX-512 VNNI kernels")


@needs_vnni
@pytest.mark.parametrize("qtype", FIVE_BIT)
def test_5_bit_types_keep_their_codes_where_the_cpu_kernels_run(qtype: Q, tmp_path: Path, home: Path,
                                                                decodes: Decodes) -> None:
    path = tmp_path / f"{qtype.name}.gguf"
    weights = write_model(path, {**dict.fromkeys(LINEARS, qtype), "attn_v": Q.Q8_0})
    want = logits(build_stage(load_stage(path).args, weights=weights))
    decodes.reset()
    stage = load_stage(path, quantize="int4 where stored", dtype=torch.bfloat16)
    assert stage.quantized == "int4"
    layer = stage.model.layers[0]
    five = [layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    assert all(isinstance(m, Int4Linear) and m.bits == 5 and m.high is not None for m in five)
    assert isinstance(layer.self_attn.qkv_proj, Int8Linear)  # a part in Q8_0: the fused linear is int8
    assert not decodes.grouped_values  # the float weights of the 5-bit linears were not decoded
    first = logits(stage.model)
    # x rounded to int8 per 32 values, as llama.cpp rounds it: 0.011-0.041 for the three types, as the 4-bit tiles give
    # for Q4_0/Q4_1 (this test with the error printed)
    assert relative_error(first, want) < 0.06
    assert all(load(p.read_bytes())["blk.0.ffn_up.weight.codes"].shape == (INTER, HIDDEN)  # a byte a code
               for p in entries(home)[:1])
    decodes.reset()
    again = load_stage(path, quantize="int4 where stored", dtype=torch.bfloat16)
    assert not decodes.groups and torch.equal(logits(again.model), first)  # read from the repack cache


@needs_vnni
def test_the_card_counts_a_5_bit_file_as_the_cpu_kernels_hold_it(tmp_path: Path, home: Path) -> None:
    """Placement's bytes of a stage (`ModelCard.stage_bytes` in the CPU engine's format where ringlet's kernels run)
    are those the loaded stage holds: 5-bit o and gate/up, 4-bit down, int8 q/k/v (a part in Q8_0)."""
    path = tmp_path / "mixed5.gguf"
    write_model(path, {**dict.fromkeys(LINEARS, Q.Q5_0), "ffn_down": Q.Q4_K, "attn_v": Q.Q8_0})
    card = card_from_path("mixed5", path)
    attention, mlp = 2 * HIDDEN * HIDDEN + 2 * KV_HEADS * HIDDEN * HIDDEN // HEADS, 3 * HIDDEN * INTER
    assert card.five_bit_share == pytest.approx((HIDDEN * HIDDEN + 2 * HIDDEN * INTER) / (attention + mlp))
    assert card.four_bit_share == pytest.approx(HIDDEN * INTER / (attention + mlp))
    stage = load_stage(path, quantize="int4 where stored", dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*stage.model.parameters(),
                                                                         *stage.model.buffers()]}.values())
    assert card.stage_bytes(0, LAYERS, CPU_TILES_STORED) == pytest.approx(held, rel=0.01)
    assert card.stage_bytes(0, LAYERS, CPU_STORED_INT4) > 1.05 * held  # where the 5-bit groups would be int8


@needs_vnni
def test_5_bit_types_are_int8_for_a_stage_that_moves_or_computes_in_fp32(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "q5_0.gguf"
    write_model(path, dict.fromkeys(LINEARS, Q.Q5_0))
    for stage in (load_stage(path, quantize="int4 where stored", dtype=torch.bfloat16, runs_here=False),
                  load_stage(path, quantize="int4 where stored", dtype=torch.float32)):
        assert stage.quantized == "int8"
        assert not any(isinstance(m, Int4Linear) for m in stage.model.modules())


def test_a_file_with_4_bit_linears_has_its_8_bit_embedding_counted_as_cuda_keeps_it(tmp_path: Path) -> None:
    """An int4 stage on CUDA keeps such a file's mix: its embedding as int8 rows, not rounded again to 4 bits; a file
    with no 4-bit linears is rounded to 4 bits whole, its embedding too."""
    from ringlet.models.catalog import CUDA_INT4

    mixed, wide = tmp_path / "q4_0.gguf", tmp_path / "q6_k.gguf"
    write_model(mixed, dict.fromkeys(LINEARS, Q.Q4_0))  # the embedding in Q8_0
    write_model(wide, dict.fromkeys(LINEARS, Q.Q6_K))
    kept, rounded = card_from_path("mixed", mixed), card_from_path("wide", wide)
    assert kept.embedding_kept_int8 and not rounded.embedding_kept_int8
    as_int8 = kept.stage_bytes(0, 1, CUDA_INT4) - kept.model_copy(update={"embedding_kept_int8": False}).stage_bytes(
        0, 1, CUDA_INT4)
    # a byte a value and a float32 scale a row, not 4-bit groups of 32 (0.625 bytes a value)
    assert as_int8 == VOCAB * HIDDEN + 4 * VOCAB - VOCAB * HIDDEN * 5 // 8
