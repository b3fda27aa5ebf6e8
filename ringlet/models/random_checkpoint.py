"""Random-weight models shaped like real ones, for benchmarks where no real weights can be downloaded.

Decode speed depends on shapes and bytes, not on the values, so a random Llama-3.1-8B reads exactly
the bytes the real one does. The tokenizer is a synthetic word-level vocabulary of the right size.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ringlet.models.config import ModelArgs
from ringlet.models.shapes import LLAMA3_ROPE, SHAPES
from ringlet.models.tokenizer import Tokenizer


def shape_config(shape: str) -> dict[str, Any]:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if SHAPES[shape].get("model_type", "llama") != "llama":
        return dict(SHAPES[shape])
    return {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_scaling": LLAMA3_ROPE, **SHAPES[shape]}


def random_weights(args: ModelArgs, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors with small random values (std 0.02, norms 1), made on the device; a sparse layer's
    experts stacked as transformers holds them ([E, 2I, H] gate and up, [E, H, I] down)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * 0.02

    weights = {"model.embed_tokens.weight": rand(args.vocab_size, h),
               "model.norm.weight": torch.ones(h, device=device, dtype=dtype)}
    if not args.tie_word_embeddings:
        weights["lm_head.weight"] = rand(args.vocab_size, h)
    for n in range(args.num_hidden_layers):
        p = f"model.layers.{n}."
        weights |= {p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                    p + "input_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
                    p + "post_attention_layernorm.weight": torch.ones(h, device=device, dtype=dtype)}
        if args.is_moe_layer(n):
            e, width = args.num_experts, args.moe_intermediate_size
            moe = p + ("block_sparse_moe." if args.model_type == "mixtral" else "mlp.")
            weights |= {moe + "gate.weight": rand(e, h), moe + "experts.gate_up_proj": rand(e, 2 * width, h),
                        moe + "experts.down_proj": rand(e, h, width)}
        else:
            weights |= {p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                        p + "mlp.down_proj.weight": rand(h, i)}
        if args.qk_norm:
            weights |= {p + f"self_attn.{x}_norm.weight": torch.ones(d, device=device, dtype=dtype) for x in "qk"}
        if args.attention_bias:
            weights |= {p + "self_attn.q_proj.bias": rand(q), p + "self_attn.k_proj.bias": rand(kv),
                        p + "self_attn.v_proj.bias": rand(kv)}
    return weights


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """Words t0 ... t{n-1}, one token each; the last id ends a sequence."""
    vocab = {f"t{n}": n for n in range(vocab_size)}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return Tokenizer(backend, eos_token_ids=[vocab_size - 1])
