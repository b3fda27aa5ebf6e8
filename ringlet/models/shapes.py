"""Shapes of well-known models, for random-weight benchmarks (no torch import: the CLI lists them)."""

from __future__ import annotations

from typing import Any

from ringlet.models.config import ModelArgs

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False, "rope_theta": 500000.0, "max_position_embeddings": 131072},
    # a small mixture of experts for CPU runs against transformers: 32 experts, 4 for each token
    "tiny-moe": {"model_type": "qwen3_moe", "hidden_size": 512, "intermediate_size": 1536, "moe_intermediate_size": 256,
                 "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True, "num_hidden_layers": 8,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000,
                 "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
                 "rms_norm_eps": 1e-6},
    # 128 experts, 8 of them for each token: 3.3 of 30.5 billion weights read a token
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "norm_topk_prob": True, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
                      "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6},
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def decode_projections(args: ModelArgs) -> list[tuple[str, int, int, bool, bool, bool]]:
    """A Llama-family layer's projections as the decode step runs them: (name, weight rows, columns, RMSNorm of the
    input first, gated (gate and up rows, SiLU(gate) * up), residual add)."""
    hidden, inter = args.hidden_size, args.intermediate_size
    heads, kv, head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    return [("q/k/v", (heads + 2 * kv) * head_dim, hidden, True, False, False),
            ("o", hidden, hidden, False, False, True),
            ("gate/up", 2 * inter, hidden, True, True, False),
            ("down", hidden, inter, False, False, True)]
