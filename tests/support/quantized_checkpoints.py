"""Tiny random Llama checkpoints, saved as quantisation tools save them (fp8 here: the packed tensors and the tool's
quantization_config), with the same model saved with the dequantised weights to compare against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ringlet.models.random_checkpoint import random_weights, synthetic_tokenizer
from ringlet.models.registry import model_args

CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
PROMPT = torch.tensor([[5, 17, 42, 8, 90, 33, 61, 2, 77, 14, 50]])


def dense_weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = random_weights(model_args(config), torch.float32, "cpu", seed=0)
    weights["model.embed_tokens.weight"] *= 20  # activations of a realistic size
    return weights


def linear_names(config: dict[str, Any]) -> list[str]:
    return [f"model.layers.{i}.{linear}" for i in range(config["num_hidden_layers"]) for linear in LINEARS]


def save(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    synthetic_tokenizer(config["vocab_size"]).backend.save(str(directory / "tokenizer.json"))
    return directory


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def fp8_quantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def fp8_reference(weight: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 values, the scale as the checkpoint stores it, the dequantised weight)."""
    n, k = weight.shape
    if scaling == "tensor":
        scale = (weight.abs().amax() / 448).reshape(1)
        values = fp8_quantize(weight, scale)
        return values, scale, values.float() * scale
    if scaling == "channel":
        scale = weight.abs().amax(dim=1, keepdim=True) / 448
        values = fp8_quantize(weight, scale)
        return values, scale, values.float() * scale
    rows, columns = -(-n // 128), -(-k // 128)
    padded = torch.zeros(rows * 128, columns * 128)
    padded[:n, :k] = weight
    blocks = padded.reshape(rows, 128, columns, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    values = fp8_quantize(blocks, scale[:, None, :, None]).reshape(rows * 128, columns * 128)[:n, :k]
    expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    return values, scale, values.float() * expanded


def compressed_tensors_config(strategy: str) -> dict[str, Any]:
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {
                "targets": ["Linear"], "output_activations": None,
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
                            "dynamic": False, "group_size": None, "block_structure": None, "observer": "minmax"},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                      "dynamic": False, "observer": "minmax"}}}}


FP8 = {  # scaling, config.json's quantization_config, the scale's tensor name, intermediate size
    "compressed-tensors per tensor": ("tensor", compressed_tensors_config("tensor"), "weight_scale", 384),
    "compressed-tensors per channel": ("channel", compressed_tensors_config("channel"), "weight_scale", 384),
    "fp8 128x128 blocks": ("block", {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [128, 128]}, "weight_scale_inv", 320),
}


def fp8_checkpoints(tmp_path: Path, case: str) -> tuple[Path, Path, dict[str, Any]]:
    scaling, settings, scale_name, intermediate = FP8[case]
    config = CONFIG | {"intermediate_size": intermediate}
    dense = dense_weights(config)
    packed, plain = dict(dense), dict(dense)
    for name in linear_names(config):
        values, scale, dequantized = fp8_reference(dense[f"{name}.weight"], scaling)
        packed[f"{name}.weight"], packed[f"{name}.{scale_name}"] = values, scale
        if settings["quant_method"] == "compressed-tensors":
            packed[f"{name}.input_scale"] = torch.tensor([0.05])
        plain[f"{name}.weight"] = dequantized
    quantized = save(tmp_path / "fp8", config | {"quantization_config": settings}, packed)
    return quantized, save(tmp_path / "dequantized", config, plain), config
