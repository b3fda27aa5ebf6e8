"""Quantised Hugging Face checkpoints (AWQ, GPTQ, fp8) against the same model saved with their dequantised weights.

Tiny random Llamas are quantised by reference quantisers written here and saved as those tools save them: packed
tensors in safetensors, the tool's quantization_config in config.json.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ringlet.models import safetensors_loader
from ringlet.models.catalog import CPU_STORED_INT4, WEIGHT_ONLY_INT8, card_from_path
from ringlet.models.fp8 import Fp8Linear, use_fp8_layer
from ringlet.models.hf_quant import QuantizedLinears, quant_scheme
from ringlet.models.loader import load_stage
from ringlet.shared.errors import ModelLoadError
from tests.support.quantized_checkpoints import (
    CONFIG,
    FP8,
    PROMPT,
    dense_weights,
    fp8_checkpoints,
    linear_names,
    relative_error,
    save,
)


def logits(path: Path, dtype: torch.dtype = torch.float32, quantize: Any = None) -> torch.Tensor:
    stage = load_stage(path, dtype=dtype, quantize=quantize)
    return stage.model(PROMPT, stage.model.make_cache(1, 64), 0).float()


# --- 4-bit groups: the reference quantiser and AWQ's and GPTQ's packings ---

@dataclass
class Reference4Bit:
    codes: torch.Tensor  # uint8 [N, K]
    zeros: torch.Tensor  # int64 [N, K / group]
    scales: torch.Tensor  # fp16 [N, K / group]
    group_size: int

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> Reference4Bit:
        """Asymmetric round-to-nearest over each group's [min, max], zero points in 1..15 (what GPTQ's original
        format can store)."""
        n, k = weight.shape
        groups = weight.reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).half()
        zeros = (-low / scales.float()).round().clamp(1, 15).long()
        codes = (groups / scales.float()[..., None]).round() + zeros[..., None]
        return cls(codes.clamp(0, 15).to(torch.uint8).reshape(n, k), zeros, scales, group_size)

    def dequantize(self) -> torch.Tensor:
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)
        return (self.codes.float() - expand(self.zeros).float()) * expand(self.scales.float())


def words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 -> int32 [...], value i in bits 4i..4i+3."""
    packed = sum(nibbles[..., i].long() << (4 * i) for i in range(8))
    assert isinstance(packed, torch.Tensor)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, N] -> int32 [rows, N / 8] as AutoAWQ's GEMM layout packs it: word c's nibble i holds column
    8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for column in range(values.shape[1] // 8):
        for i, source in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            packed[:, column] |= values[:, column * 8 + source].long() << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def awq_tensors(name: str, ref: Reference4Bit) -> dict[str, torch.Tensor]:
    return {f"{name}.qweight": awq_pack(ref.codes.t()), f"{name}.qzeros": awq_pack(ref.zeros.t()),
            f"{name}.scales": ref.scales.t().contiguous()}


def gptq_tensors(name: str, ref: Reference4Bit, zero_offset: int,
                 group_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """GPTQ's packing: eight consecutive inputs a qweight word, eight consecutive outputs a qzeros word. With
    `group_labels`, run j of the inputs is numbered group_labels[j] (act-order), its scales and zeros stored there."""
    n, k = ref.codes.shape
    zeros, scales = ref.zeros.t() - zero_offset, ref.scales.t()
    g_idx = torch.arange(k, dtype=torch.int32) // ref.group_size
    if group_labels is not None:
        zeros, scales = torch.empty_like(zeros), torch.empty_like(scales)
        zeros[group_labels], scales[group_labels] = ref.zeros.t() - zero_offset, ref.scales.t()
        g_idx = group_labels[g_idx.long()].to(torch.int32)
    return {f"{name}.qweight": words(ref.codes.t().reshape(k // 8, 8, n).permute(0, 2, 1)),
            f"{name}.qzeros": words(zeros.reshape(-1, n // 8, 8)),
            f"{name}.scales": scales.contiguous(), f"{name}.g_idx": g_idx}


def four_bit_checkpoints(tmp_path: Path, method: str, group_size: int,
                         **gptq: Any) -> tuple[Path, Path, dict[str, Reference4Bit]]:
    """(the quantised checkpoint, the same model with its dequantised weights, the reference per linear)."""
    dense = dense_weights(CONFIG)
    packed, plain, references = dict(dense), dict(dense), {}
    for name in linear_names(CONFIG):
        ref = references[name] = Reference4Bit.quantize(dense[f"{name}.weight"], group_size)
        del packed[f"{name}.weight"]
        plain[f"{name}.weight"] = ref.dequantize()
        if method == "awq":
            packed |= awq_tensors(name, ref)
        else:
            packed |= gptq_tensors(name, ref, 0 if gptq.get("checkpoint_format") == "gptq_v2" else 1,
                                   gptq.get("group_labels"))
    if method == "awq":
        settings = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm",
                    "zero_point": True, "modules_to_not_convert": None}
    else:
        settings = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": "group_labels" in gptq,
                    "sym": False, "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
                    "checkpoint_format": gptq.get("checkpoint_format", "gptq")}
    quantized = save(tmp_path / method, CONFIG | {"quantization_config": settings}, packed)
    return quantized, save(tmp_path / "dequantized", CONFIG, plain), references


FOUR_BIT = {"awq, groups of 64": ("awq", 64, {}), "awq, groups of 128": ("awq", 128, {}),
            "gptq, groups of 32": ("gptq", 32, {}),
            "gptq_v2, groups of 128": ("gptq", 128, {"checkpoint_format": "gptq_v2"})}


@pytest.mark.parametrize("case", sorted(FOUR_BIT))
@torch.no_grad()
def test_four_bit_checkpoint_gives_the_dequantised_models_logits(tmp_path: Path, case: str) -> None:
    method, group_size, gptq = FOUR_BIT[case]
    quantized, dequantized, _ = four_bit_checkpoints(tmp_path, method, group_size, **gptq)
    reference = logits(dequantized)
    torch.testing.assert_close(logits(quantized), reference, atol=1e-4, rtol=1e-4)

    # the CPU engine's auto precision runs the file's own codes through the int4 kernels
    stage = load_stage(quantized, dtype=torch.bfloat16, quantize="int4 where stored")
    assert stage.quantized == "int4"
    assert not isinstance(stage.model.layers[0].mlp.down_proj, nn.Linear)
    ours = stage.model(PROMPT, stage.model.make_cache(1, 64), 0).float()
    assert relative_error(ours, reference) < 0.03


@pytest.mark.parametrize("case", sorted(FOUR_BIT))
def test_unpacked_groups_are_the_reference_codes_exactly(tmp_path: Path, case: str) -> None:
    method, group_size, gptq = FOUR_BIT[case]
    quantized, _, references = four_bit_checkpoints(tmp_path, method, group_size, **gptq)
    stored = safetensors_loader.quantized_linears(quantized, safetensors_loader.read_config(quantized))
    assert stored is not None and stored.stores_groups(0, 1)
    groups = stored.load_groups(0, 2)
    assert set(groups) == {f"{name}.weight" for name in references}
    for name, ref in references.items():
        got = groups[f"{name}.weight"]
        assert got.group_size == group_size
        assert torch.equal(got.codes, ref.codes), name
        assert torch.equal(got.scale, ref.scales.float()), name
        torch.testing.assert_close(got.offset, -ref.zeros.float() * ref.scales.float(), atol=0, rtol=0)


def test_act_order_groups_numbered_out_of_order_are_reordered(tmp_path: Path) -> None:
    labels = torch.randperm(CONFIG["intermediate_size"] // 32, generator=torch.Generator().manual_seed(4))
    dense = dense_weights(CONFIG)
    ref = Reference4Bit.quantize(dense["model.layers.0.mlp.down_proj.weight"], 32)
    quantized = save(tmp_path / "desc", CONFIG | {"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}},
        gptq_tensors("model.layers.0.mlp.down_proj", ref, 1, labels))
    stored = safetensors_loader.quantized_linears(quantized, safetensors_loader.read_config(quantized))
    assert stored is not None
    got = stored.load_groups(0, 1)["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scale, ref.scales.float())
    torch.testing.assert_close(got.dequantize(), ref.dequantize())


def test_act_order_groups_of_scattered_inputs_are_refused_by_name(tmp_path: Path) -> None:
    dense = dense_weights(CONFIG)
    ref = Reference4Bit.quantize(dense["model.layers.0.mlp.down_proj.weight"], 32)
    tensors = gptq_tensors("model.layers.0.mlp.down_proj", ref, 1)
    tensors["model.layers.0.mlp.down_proj.g_idx"] = torch.arange(CONFIG["intermediate_size"], dtype=torch.int32) % 12
    quantized = save(tmp_path / "scattered", CONFIG | {"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}}, tensors)
    stored = safetensors_loader.quantized_linears(quantized, safetensors_loader.read_config(quantized))
    assert stored is not None
    with pytest.raises(ModelLoadError, match=r"down_proj: .*desc_act"):
        stored.load_groups(0, 1)


# --- fp8 ---

@pytest.mark.parametrize("case", sorted(FP8))
@torch.no_grad()
def test_fp8_checkpoint_gives_the_dequantised_models_logits(tmp_path: Path, case: str) -> None:
    quantized, dequantized, _ = fp8_checkpoints(tmp_path, case)
    reference = logits(dequantized)
    torch.testing.assert_close(logits(quantized), reference, atol=1e-5, rtol=1e-5)
    # the CPU engine's auto precision: dequantised once, then int8 per output channel
    stage = load_stage(quantized, dtype=torch.bfloat16, quantize="int4 where stored")
    assert stage.quantized == "int8"
    ours = stage.model(PROMPT, stage.model.make_cache(1, 64), 0).float()
    assert relative_error(ours, reference) < 0.03


@pytest.mark.parametrize("case", sorted(FP8))
@torch.no_grad()
def test_fp8_linears_give_the_dequantised_models_logits(tmp_path: Path, case: str) -> None:
    """The fp8 linears a GPU with fp8 tensor cores runs, here through the CPU's `torch._scaled_mm`: each token's
    activations rounded to fp8 cost a few percent, no more."""
    quantized, dequantized, _ = fp8_checkpoints(tmp_path, case)
    reference = logits(dequantized)
    stage = load_stage(quantized, dtype=torch.float32)
    stored = safetensors_loader.quantized_linears(quantized, safetensors_loader.read_config(quantized))
    assert stored is not None and not stored.stores_groups(0, 2)
    for i, layer in enumerate(stage.model.layers):
        assert use_fp8_layer(layer, i, torch.float32, stored.load_fp8(i, i + 1, "cpu")) == 4
    down = stage.model.layers[0].mlp.down_proj
    assert isinstance(down, Fp8Linear)
    assert down.per_channel == (FP8[case][0] != "block")  # blocks along its 320 inputs: dequantised in the matmul
    ours = stage.model(PROMPT, stage.model.make_cache(1, 64), 0).float()
    assert relative_error(ours, reference) < 0.05


# --- what is refused, and how it reads ---

@pytest.mark.parametrize(("settings", "named"), [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "hqq", "nbits": 4}, "'hqq'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "awq version 'gemv'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq 8-bit"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 256}, "gptq with group_size 256"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors format 'pack-quantized'"),
])
def test_an_unsupported_quantisation_is_refused_by_name(tmp_path: Path, settings: dict[str, Any], named: str) -> None:
    path = save(tmp_path / "model", CONFIG | {"quantization_config": settings}, dense_weights(CONFIG))
    with pytest.raises(ModelLoadError, match=f"quantised with {named}.*it reads AWQ.*GPTQ.*fp8"):
        load_stage(path)
    with pytest.raises(ModelLoadError, match=named):  # the card a node places by
        card_from_path("some/model", path)


def test_run_names_an_unsupported_quantisation_in_one_line(tmp_path: Path) -> None:
    path = save(tmp_path / "model", CONFIG | {"quantization_config": {"quant_method": "bitsandbytes"}},
                dense_weights(CONFIG))
    result = subprocess.run([sys.executable, "-m", "ringlet", "run", "hi", "--model", str(path)], check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'bitsandbytes'" in lines[0], result.stderr


def test_a_four_bit_checkpoints_card_counts_its_layers_in_four_bit_groups(tmp_path: Path) -> None:
    quantized, dequantized, _ = four_bit_checkpoints(tmp_path, "awq", 64)
    card, plain = card_from_path("tiny/awq", quantized), card_from_path("tiny/plain", dequantized)
    assert card.four_bit_share == 1.0 and plain.four_bit_share == 0.0
    assert card.bytes_per_dtype["awq"] == (quantized / "model.safetensors").stat().st_size
    assert card.stage_bytes(0, 2, CPU_STORED_INT4) < plain.stage_bytes(0, 2, CPU_STORED_INT4), "kept by default"
    assert card.stage_bytes(0, 2, WEIGHT_ONLY_INT8) == plain.stage_bytes(0, 2, WEIGHT_ONLY_INT8), "int8 asked for"


def test_a_layers_packed_tensors_are_read_once_for_its_weights_and_its_codes(tmp_path: Path) -> None:
    quantized, _, references = four_bit_checkpoints(tmp_path, "awq", 64)
    reads: Counter[str] = Counter()
    scheme = quant_scheme(safetensors_loader.read_config(quantized))
    assert scheme is not None
    with safe_open(str(quantized / "model.safetensors"), framework="pt") as handle:
        def read(name: str) -> torch.Tensor:
            reads[name] += 1
            return handle.get_tensor(name)

        linears = QuantizedLinears(scheme, handle.keys(), read)
        for layer in range(2):
            names = [f"{name}.weight" for name in references if name.startswith(f"model.layers.{layer}.")]
            for name in names:  # as the layer is built
                linears.dense(name, torch.bfloat16)
            assert set(linears.load_groups(layer, layer + 1)) == set(names)  # as it is quantised
    assert len(reads) == 3 * len(references) and set(reads.values()) == {1}
