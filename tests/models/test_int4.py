"""Weight-only int4 on CPUs: a GGUF file's own 4-bit groups used as they are, rounding for anything else, the
two matmul paths (int4 kernel for a decode row, unpacked dense weight for a long prompt chunk), and the engine's
choice of int4 for the embedded Q4_1 model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from ringlet.models import quant_format
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.quant import (
    GroupQuantized,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    cpu_supports_bf16,
    embed_rows,
    fused_with,
    quantize_int4,
    quantize_layer_int4,
)
from ringlet.models.quant_format import read_rows_int4, read_rows_int8, round_rows_int8
from ringlet.models.registry import build_stage, model_args
from ringlet.models.weights import LazyWeights
from ringlet.worker.engines.torch.engine import load_torch_stage
from tests.support.tiny_gguf import HIDDEN, LAYER_WEIGHTS, LAYERS, VOCAB, write_tiny_gguf

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="int4 runs with bf16 activations (AVX-512 BF16/AMX)")


def test_rounding_stays_within_half_a_step() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    groups = GroupQuantized.round(weight)
    assert groups.codes.dtype == torch.uint8 and int(groups.codes.max()) <= 15
    error = (groups.dequantize() - weight).abs().reshape(48, 3, 32)
    assert (error <= groups.scale[..., None] / 2 + 1e-6).all()
    both = GroupQuantized.cat([groups, GroupQuantized.round(weight[:16])])
    assert torch.equal(both.dequantize()[48:], groups.dequantize()[:16])


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, Int4Linear.DENSE_FROM_ROWS + 5])
def test_int4_linear_matches_its_dequantised_weight(rows: int) -> None:
    torch.manual_seed(1)
    groups = GroupQuantized.round(torch.randn(160, 64))
    bias = torch.randn(160)
    linear = Int4Linear(groups, bias, torch.bfloat16)
    x = torch.randn(2, rows, 64)
    expected = F.linear(x, groups.dequantize(), bias)
    got = linear(x.bfloat16()).float()
    assert got.shape == (2, rows, 160)
    assert float((got - expected).norm() / expected.norm()) < 0.02  # bf16 activations, scales and sums
    if rows >= Int4Linear.DENSE_FROM_ROWS:  # the dense path unpacks exactly the codes the kernel uses
        one_row = linear(x[:, :1].bfloat16()).float()
        assert float((got[:, :1] - one_row).abs().max()) < 0.05 * float(one_row.abs().max())


def test_gguf_groups_are_the_files_own_codes(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    model = GGUFModel.open(path)
    groups = model.load_groups(0, LAYERS)
    state = model.load_state_dict(0, LAYERS)
    expected = {f"model.layers.{i}.{hf}" for i in range(LAYERS) for hf, (_, _, *types) in LAYER_WEIGHTS.items()
                if types[i] in (Q.Q4_0, Q.Q4_1, Q.Q4_K)}
    assert set(groups) == expected
    for name, group in groups.items():  # q/k un-permuted like the dequantised tensors, bit for bit
        assert torch.equal(group.dequantize(), state[name]), name
    assert "model.layers.0.self_attn.q_proj.weight" in groups  # a permuted Q4_1 q_proj is among them


@needs_bf16
@pytest.mark.usefixtures("pytorch_cpu_kernels")
def test_quantize_int4_uses_file_groups_where_every_part_has_them_and_int8_where_the_file_has_more_bits(
        tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    gguf = GGUFModel.open(path)  # (a tiny file has no tokenizer, so not through load_stage)
    args, groups = model_args(gguf.config), gguf.load_groups(0, LAYERS)
    reference = build_stage(args, weights=gguf.load_state_dict(0, LAYERS), dtype=torch.float32)
    model = build_stage(args, weights=gguf.load_state_dict(0, LAYERS), dtype=torch.bfloat16)
    model = quantize_int4(model, torch.bfloat16, groups)
    # layer 1's down_proj is Q4_0 in the file: its int4 codes are the file's, exactly, its scales the file's in bf16
    down = model.layers[1].mlp.down_proj
    assert isinstance(down, Int4Linear)
    stored = groups["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(down.codes(), stored.codes)
    torch.testing.assert_close(down.groups().scale, stored.scale.bfloat16().float(), rtol=0, atol=0)
    file_weight = stored.dequantize()
    torch.testing.assert_close(down.dense_weight(torch.float32), file_weight, rtol=2**-7, atol=1e-6)
    # q Q4_1, k Q8_0, v BF16: the file keeps k and v in more bits, so the fused linear is int8, not rounded to 4
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert isinstance(model.layers[1].self_attn.o_proj, Int4Linear)  # Q4_1
    assert isinstance(model.layers[0].mlp.down_proj, Int8Linear)  # F16
    assert isinstance(model.lm_head, Int8Linear)

    def held(linear: torch.nn.Module) -> torch.Tensor:
        if isinstance(linear, Int4Linear):
            return linear.dense_weight(torch.float32)
        assert isinstance(linear, Int8Linear)
        return linear.weight.float() * linear.scales.float()[:, None]

    # the same model in fp32 with the weights the int4 model actually holds: only bf16 arithmetic differs
    with torch.no_grad():
        for mine, theirs in zip(model.layers, reference.layers):
            for path in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                theirs.get_submodule(path).weight.copy_(held(mine.get_submodule(path)))
        reference.lm_head.weight.copy_(held(model.lm_head))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        got = model(ids, model.make_cache(1, 16), 0).float()
        want = reference(ids, reference.make_cache(1, 16), 0)
    assert float((got - want).norm() / want.norm()) < 0.03


@pytest.mark.slow
@needs_bf16
def test_embedded_model_runs_int4_by_default_and_agrees_with_fp32() -> None:
    stage, precision = load_torch_stage(None)
    assert precision == "int4" and stage.quantized == "int4"
    assert all(isinstance(layer.mlp.gate_up_proj, Int4Linear) for layer in stage.model.layers)
    full, _ = load_torch_stage(None, precision="fp32")
    ids = torch.tensor([full.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.inference_mode():
        got = stage.model(ids, stage.model.make_cache(1, 64), 0).float()[0, -1]
        want = full.model(ids, full.model.make_cache(1, 64), 0)[0, -1]
    assert int(got.argmax()) == int(want.argmax())
    assert float(F.cosine_similarity(got, want, dim=0)) > 0.99
    with pytest.raises(ValueError, match="CPUs and CUDA GPUs"):
        load_torch_stage(None, precision="int4", device=torch.device("xpu"))


@needs_bf16
def test_rounding_to_int4_without_a_files_groups() -> None:
    args = model_args({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96})
    model = quantize_int4(build_stage(args, dtype=torch.bfloat16), torch.bfloat16)
    assert all(isinstance(model.layers[0].get_submodule(path), Int4Linear)
               for path in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))


def test_a_file_with_4_bit_groups_says_once_which_other_types_are_dequantised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    model = GGUFModel.open(path)
    with caplog.at_level("INFO", logger="ringlet.models.gguf_loader"):
        assert model.stores_groups(0, LAYERS)
        for i in range(LAYERS):  # loading reads the groups layer by layer: no line per layer
            model.load_groups(i, i + 1)
    [line] = [r.getMessage() for r in caplog.records]
    assert line == "tiny.gguf: weights of layers 0-1 stored as Q8_0 (3) are dequantised (not groups the kernels take)"


@pytest.mark.parametrize("rows", [576, 160, 96, 48, 32])  # whole blocks of 64 rows, and rows past the last one
def test_int4_linear_keeps_its_codes_once_in_the_kernels_layout_and_unpacks_them_exactly(rows: int) -> None:
    torch.manual_seed(2)
    groups = GroupQuantized.round(torch.randn(rows, 128))
    linear = Int4Linear(groups, None, torch.bfloat16)
    assert linear.nibbles is None  # no second copy of the codes
    assert linear.weight.numel() == rows * 128 // 2  # half a byte a weight
    assert torch.equal(linear.codes(), groups.codes)
    assert torch.equal(linear.groups().codes, groups.codes)


def test_a_files_groups_go_to_the_device_the_stage_is_built_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF file's groups are decoded on the host; a stage built on a GPU gets them on the GPU, so the int4 linear
    made for them is the GPU's. "meta" stands for a device other than the host's."""
    from ringlet.models import quant

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    gguf = GGUFModel.open(path)
    model = build_stage(model_args(gguf.config), weights=gguf.load_state_dict(0, LAYERS), dtype=torch.bfloat16)
    groups = gguf.load_groups(0, LAYERS)
    seen: list[torch.device] = []

    def recording(g: GroupQuantized, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.nn.Module:
        seen.append(g.codes.device)
        return torch.nn.Identity()

    monkeypatch.setattr(quant, "int4_linear", recording)
    for i, layer in enumerate(model.layers):
        quant.quantize_layer_int4(layer, i, torch.bfloat16, groups, file_groups=True, device="meta")
    assert seen and all(device == torch.device("meta") for device in seen)
    # by default, the device the linears are on; a linear without values must be told, and must have groups
    bare = build_stage(model_args(gguf.config), weights=gguf.load_state_dict(0, LAYERS)).to("meta")
    with pytest.raises(ValueError, match="neither weights nor the file's groups"):
        quant.quantize_layer_int4(bare.layers[0], 0, torch.bfloat16, groups, file_groups=True)
    every = {f"model.layers.0.{name}": GroupQuantized.round(torch.randn(shape))
             for name, (_, shape, *_) in LAYER_WEIGHTS.items() if len(shape) == 2}
    with pytest.raises(ValueError, match="need the device"):
        quant.quantize_layer_int4(bare.layers[0], 0, torch.bfloat16, every, file_groups=True)


def test_an_int4_load_makes_no_float_values_of_linears_it_takes_from_the_files_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a weight fused with one the file stores in more bits (it becomes int8 with it) is decoded to values."""
    from ringlet.models import gguf_loader

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    decoded: list[tuple[int, ...]] = []
    decode = gguf_loader.dequantize_groups

    def counting(groups: GroupQuantized, dtype: torch.dtype) -> torch.Tensor:
        decoded.append(tuple(groups.codes.shape))
        return decode(groups, dtype)

    monkeypatch.setattr(gguf_loader, "dequantize_groups", counting)
    gguf = GGUFModel.open(path)
    layer_groups = gguf.stage_groups(0, LAYERS)
    assert layer_groups is not None
    stage = build_stage(model_args(gguf.config), weights=gguf.lazy_state_dict(0, LAYERS, torch.bfloat16, layer_groups),
                        dtype=torch.bfloat16, finish_layer=lambda layer, i: quantize_layer_int4(
                            layer, i, torch.bfloat16, layer_groups.of_layer(i), file_groups=True, device="cpu"))
    fused_int8 = sum(isinstance(m, Int8Linear) for m in stage.layers.modules())
    fused_int4 = sum(isinstance(m, Int4Linear) for m in stage.layers.modules())
    assert fused_int4 > 0 and fused_int8 > 0  # the tiny file mixes 4-bit types with wider ones
    grouped_in_int8 = [(i, name) for i in range(LAYERS) for name, (_, _, *types) in LAYER_WEIGHTS.items()
                       if types[i] in (Q.Q4_0, Q.Q4_1, Q.Q4_K) and not _all_grouped(name, i)]
    assert len(decoded) == len(grouped_in_int8)
    assert not any(p.is_meta for p in [*stage.parameters(), *stage.buffers()])


def _all_grouped(name: str, index: int) -> bool:
    """Whether every weight of the fused linear `name` (an HF name in a layer) is stored in 4-bit groups."""
    parts = fused_with(f"model.layers.{index}.{name}")
    grouped = {Q.Q4_0, Q.Q4_1, Q.Q4_K}
    return all(LAYER_WEIGHTS[part.split(f"layers.{index}.")[1]][2 + index] in grouped for part in parts)


def test_int8_rows_read_a_slice_at_a_time_are_the_whole_weights_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant_format, "VALUES_AT_ONCE", 7 * 24)  # slices of 7 rows, which do not divide 50
    weight = torch.randn(50, 24)
    reads: list[tuple[int, int]] = []

    def read(first: int, end: int) -> torch.Tensor:
        reads.append((first, end))
        return weight[first:end].to(torch.bfloat16)

    rows = read_rows_int8(50, read, 24, "cpu")
    whole = round_rows_int8(weight.to(torch.bfloat16))
    assert torch.equal(rows.codes, whole.codes) and torch.equal(rows.step, whole.step)
    assert reads == [(first, min(50, first + 7)) for first in range(0, 50, 7)]
    # each value within half a step of its row
    assert float(((rows.codes.float() * rows.step[:, None] - weight.bfloat16().float()).abs()
                  / rows.step[:, None]).max()) <= 0.5 + 1e-4
    with pytest.raises(ValueError, match="came as"):
        read_rows_int8(50, lambda first, end: weight[first:end + 1], 24, "cpu")


def test_an_int8_embedding_looks_up_its_rows_within_half_a_step() -> None:
    weight = torch.randn(40, 16) * torch.linspace(0.01, 3, 40)[:, None]  # rows of very different sizes
    embedding = Int8Embedding(round_rows_int8(weight), torch.bfloat16)
    ids = torch.tensor([[0, 39, 7, 7], [12, 3, 0, 25]])
    got = embedding(ids)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 4, 16)
    step = embedding.step[ids][..., None]
    # half a step of rounding, then bf16's own rounding of the result
    assert bool(((got.float() - weight[ids]).abs() <= 0.5 * step + weight[ids].abs() / 128).all())
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    embed_rows(embedding, ids[0], out)
    assert torch.equal(out, got[0])
    dense = torch.nn.Embedding.from_pretrained(weight)
    out = torch.empty(4, 16)
    embed_rows(dense, ids[1], out)
    assert torch.equal(out, weight[ids[1]])


def test_an_int4_embedding_looks_up_its_rows_within_half_a_step_of_their_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant_format, "VALUES_AT_ONCE", 3 * 64)  # rounded 3 rows at a time
    weight = torch.randn(40, 64) * torch.linspace(0.01, 3, 40)[:, None]
    weight[5, :32] = 0.25  # a group of one value: no step, its value kept
    rows = read_rows_int4(40, lambda first, end: weight[first:end], 64, "cpu")
    assert rows.packed.shape == (40, 32) and rows.step.shape == rows.minimum.shape == (40, 2)
    assert rows.step.dtype == rows.minimum.dtype == torch.float16
    embedding = Int4Embedding(rows, torch.bfloat16)
    ids = torch.tensor([[0, 39, 5, 5], [12, 3, 0, 25]])
    got = embedding(ids)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 4, 64)
    step = rows.step[ids].float().repeat_interleave(32, dim=-1)
    # half a step of rounding (the fp16 minimum's own rounding inside it), then bf16's rounding of the result
    error = (got.float() - weight[ids]).abs()
    assert bool((error <= 0.5 * step + weight[ids].abs() / 128 + 1e-3 * weight[ids].abs().amax()).all())
    assert bool((got[0, 2, :32].float() == 0.25).all())
    # the levels span each group: its smallest and largest values come back, to fp16's and bf16's rounding
    groups, back = weight[ids[1]].view(4, 2, 32), got[1].float().view(4, 2, 32)
    for ends in (torch.amin, torch.amax):
        assert torch.allclose(ends(back, -1), ends(groups, -1), rtol=1e-2, atol=1e-3)
    out = torch.empty(4, 64, dtype=torch.bfloat16)
    embed_rows(embedding, ids[1], out)  # the Triton kernel (in its interpreter here, which rounds bf16 down)
    torch.testing.assert_close(out, got[1], rtol=2**-7, atol=0)
    with pytest.raises(ValueError, match="whole groups of 32"):
        read_rows_int4(40, lambda first, end: weight[first:end, :48], 48, "cpu")


@pytest.mark.parametrize("tied", [False, True])
def test_a_quantised_stage_rounds_its_embedding_and_lm_head_to_int8_rows_as_it_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool) -> None:
    monkeypatch.setattr(quant_format, "VALUES_AT_ONCE", 5 * 64)  # the vocabulary read 5 rows at a time
    path = tmp_path / "tiny.gguf"
    originals = write_tiny_gguf(path, tied=tied)
    gguf_model = GGUFModel.open(path)
    args = model_args(gguf_model.config)
    model = build_stage(args, weights=gguf_model.lazy_state_dict(0, LAYERS, torch.bfloat16), dtype=torch.bfloat16,
                        int8_ends=True)
    assert isinstance(model.embed_tokens, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    if tied:  # one tensor of codes for both
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    # the file's values (Q8_0 embedding, Q4_0 lm_head) rounded to int8 per row, the same as rounding them whole
    for module, name in ((model.embed_tokens, "token_embd.weight"), (model.lm_head, "output.weight")):
        if tied and name == "output.weight":
            continue
        whole = round_rows_int8(gguf_model._read_tensor(name, torch.bfloat16))
        assert torch.equal(module.codes(), whole.codes), name  # (kept in tiles on a VNNI CPU)
    # the model's logits stay those of the dequantised file
    full = build_stage(args, weights=gguf_model.lazy_state_dict(0, LAYERS))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        got = model(ids, model.make_cache(1, 16), 0).float()
        want = full(ids, full.make_cache(1, 16), 0)
    assert float((got - want).norm() / want.norm()) < 0.05
    assert "lm_head.weight" not in originals if tied else "lm_head.weight" in originals


@pytest.mark.parametrize("tied", [False, True])
def test_an_int4_embedding_is_kept_where_it_is_not_also_the_lm_head(tmp_path: Path, tied: bool) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=tied)
    gguf_model = GGUFModel.open(path)
    args = model_args(gguf_model.config)
    model = build_stage(args, weights=gguf_model.lazy_state_dict(0, LAYERS, torch.bfloat16), dtype=torch.bfloat16,
                        int8_ends=True, int4_embedding=True)
    assert isinstance(model.embed_tokens, Int8Embedding if tied else Int4Embedding)  # a tied head shares int8 codes
    assert isinstance(model.lm_head, Int8Linear)
    full = build_stage(args, weights=gguf_model.lazy_state_dict(0, LAYERS))
    if not tied:  # the file's embedding rounded whole to the same codes; the model's logits are those of its values
        table = gguf_model._read_tensor("token_embd.weight", torch.bfloat16)
        whole = read_rows_int4(VOCAB, lambda first, end: table[first:end], HIDDEN, "cpu")
        assert torch.equal(model.embed_tokens.packed, whole.packed)
        full.embed_tokens.weight.data = Int4Embedding(whole, torch.float32)(torch.arange(VOCAB))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        got = model(ids, model.make_cache(1, 16), 0).float()
        want = full(ids, full.make_cache(1, 16), 0)
    assert float((got - want).norm() / want.norm()) < 0.05
    held = sum(t.numel() * t.element_size() for t in model.embed_tokens.buffers())
    assert held == (VOCAB * HIDDEN * 5 // 8 if not tied else VOCAB * (HIDDEN + 4))


def test_a_load_reads_each_tensor_from_its_file_once(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    gguf = GGUFModel.open(path)
    reads: Counter[str] = Counter()
    weights = gguf.lazy_state_dict(0, LAYERS)

    def counted(name: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            reads[name] += 1
            return weights[name]
        return read

    build_stage(model_args(gguf.config), weights=LazyWeights({name: counted(name) for name in weights}))
    assert set(reads) == set(weights) and set(reads.values()) == {1}
