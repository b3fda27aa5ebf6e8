"""Small random-weight models for the kernel and engine tests: one Llama and its variants (biases, per-head
norms), with norms that are not all ones and activations of a realistic size; and the GPU tests' larger model."""

from __future__ import annotations

from pathlib import Path

import torch

from ringlet.models import safetensors_loader
from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.random_checkpoint import random_weights
from ringlet.models.registry import build_stage, model_args

BASE = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 120,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
VARIANTS = {
    "llama (3 query heads a key head, tied lm_head)": {},
    "qwen2 (q/k/v biases, untied lm_head)": {"model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3 (per-head q/k norms)": {"model_type": "qwen3", "num_key_value_heads": 3},
    "yarn rope scaling (cos and sin scaled by its attention factor)": {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
}

# the GPU tests' model: big enough for the tuned kernels' tile shapes, small enough to build in a second
GPU_CONFIG = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False}


def random_model(config: dict, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    args = model_args(config)
    return build_stage(args, weights=checkpoint_weights(args), dtype=dtype, device="cpu")


def checkpoint_weights(args: ModelArgs) -> dict[str, torch.Tensor]:
    """`random_model`'s tensors, Hugging Face-named."""
    weights = random_weights(args, torch.float32, "cpu", seed=2)
    generator = torch.Generator().manual_seed(3)
    for name in list(weights):
        if name.endswith("norm.weight"):  # not all ones: a kernel that skips a norm's scale must fail
            weights[name] = 1 + 0.3 * torch.randn(weights[name].shape, generator=generator)
    for n in range(args.num_hidden_layers):
        attention = f"model.layers.{n}.self_attn."
        if args.attention_bias:
            for p, size in (("q", args.num_attention_heads), ("k", args.num_key_value_heads),
                            ("v", args.num_key_value_heads)):
                weights[attention + f"{p}_proj.bias"] = 0.1 * torch.randn(size * args.head_dim, generator=generator)
        if args.qk_norm:
            for p in "qk":
                weights[attention + f"{p}_norm.weight"] = 1 + 0.3 * torch.randn(args.head_dim, generator=generator)
    weights["model.embed_tokens.weight"] *= 20  # activations of a realistic size, not 0.02
    return weights


def load_checkpoint_stage(path: Path, start: int = 0, end: int | None = None):  # type: ignore[no-untyped-def]
    """Layers [start, end) of the safetensors checkpoint in `path`, read lazily as a node's loader reads them."""
    args = model_args(safetensors_loader.read_config(path))
    end = args.num_hidden_layers if end is None else end
    weights = safetensors_loader.lazy_weights(path, start, end, args.num_hidden_layers, args.tie_word_embeddings)
    return build_stage(args, start, end, weights=weights)


def sharpened(model: Transformer) -> Transformer:
    """`model` with its queries scaled up: scores far apart, so that the splits' maxima differ and the join's weights
    of them matter."""
    q_rows = model.args.num_attention_heads * model.args.head_dim
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.qkv_proj.weight[:q_rows] *= 20
    return model
