"""Model hyper-parameters, built from a Hugging Face style `config.json` dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ringlet.shared.errors import ModelLoadError


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v projections
    qk_norm: bool = False  # qwen3: RMSNorm on each head of q and k
    sliding_window: int | None = None  # mistral v0.1; we serve at most this many positions
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Keep only the keys this class knows; fill defaults the way transformers does."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in known and v is not None}
        values.setdefault("num_key_value_heads", config.get("num_attention_heads"))
        # transformers >= 5 writes rope settings as one `rope_parameters` dict
        if rope := config.get("rope_parameters"):
            values.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope.get("rope_type", "default") != "default":
                values.setdefault("rope_scaling", rope)
        if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
            raise ModelLoadError("only SiLU-gated MLPs without bias are supported (hidden_act 'silu', mlp_bias false)")
        eos = values.get("eos_token_id", [])
        values["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
        if config.get("model_type") == "qwen2":
            values.setdefault("attention_bias", True)
        if config.get("model_type") == "qwen3":
            values["qk_norm"] = True
        values.update(overrides)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ModelLoadError(f"config is missing required keys: {', '.join(missing)}")
        return cls(**values)

    @property
    def context_length(self) -> int:
        if self.model_type == "mistral" and self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def num_parameters(self) -> int:
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        return self.num_hidden_layers * per_layer + embed * (1 if self.tie_word_embeddings else 2) + h
