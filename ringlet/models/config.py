"""Model hyper-parameters, built from a Hugging Face style `config.json` dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ringlet.shared.errors import ModelLoadError

PHI3_ORIGINAL = 4096  # transformers' Phi3Config default of original_max_position_embeddings


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
    sliding_window: int | None = None  # mistral v0.1, phi3; we serve at most this many positions
    partial_rotary_factor: float = 1.0  # phi3 (Phi-4-mini): rotary on the first share of each head's dims only
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # mixture of experts (qwen3_moe, mixtral): each token runs `num_experts_per_tok` of `num_experts` SiLU-gated MLPs
    # of `moe_intermediate_size`, weighted by the router's softmax over all experts (renormalised over the chosen
    # ones with `norm_topk_prob`); a layer in `mlp_only_layers` or off the `decoder_sparse_step` grid is dense
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ModelLoadError(f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} "
                                 f"rotates {self.rotary_dim} dims a head; it must be an even count, 2 to head_dim")
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
            if rope.get("partial_rotary_factor") is not None:
                values["partial_rotary_factor"] = rope["partial_rotary_factor"]  # over a top-level one, as transformers
            if rope.get("rope_type", "default") != "default":
                values.setdefault("rope_scaling", rope)
        if scaling := values.get("rope_scaling"):
            if scaling.get("partial_rotary_factor") is not None:
                values["partial_rotary_factor"] = scaling["partial_rotary_factor"]
            values["rope_scaling"] = _standard_rope_scaling(config, scaling)
        if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
            raise ModelLoadError("only SiLU-gated MLPs without bias are supported (hidden_act 'silu', mlp_bias false)")
        eos = values.get("eos_token_id", [])
        values["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
        if config.get("model_type") == "qwen2":
            values.setdefault("attention_bias", True)
        if config.get("model_type") in ("qwen3", "qwen3_moe"):
            values["qk_norm"] = True
        values.update(_experts(config))
        values.update(overrides)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ModelLoadError(f"config is missing required keys: {', '.join(missing)}")
        return cls(**values)

    @property
    def context_length(self) -> int:
        if self.model_type in ("mistral", "phi3") and self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that the rotary embedding turns (transformers' int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_parameters(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        embed = self.vocab_size * h
        layers = sum(attn + self.mlp_parameters(n) + 2 * h for n in range(self.num_hidden_layers))
        return layers + embed * (1 if self.tie_word_embeddings else 2) + h

    @property
    def has_experts(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def mlp_parameters(self, layer: int) -> int:
        """Weights of layer `layer`'s MLP: every expert's and the router's in a mixture-of-experts layer."""
        if self.is_moe_layer(layer):
            return self.num_experts * (3 * self.hidden_size * self.moe_intermediate_size + self.hidden_size)
        return 3 * self.hidden_size * self.intermediate_size


def _experts(config: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts settings as ModelArgs names them: Mixtral's experts count `num_local_experts`, are as
    wide as `intermediate_size` and always renormalise the chosen experts' weights."""
    kind = config.get("model_type")
    if kind not in ("qwen3_moe", "mixtral"):
        return {}
    experts = config.get("num_experts", config.get("num_local_experts"))
    if not experts or not config.get("num_experts_per_tok") or not config.get(
            "moe_intermediate_size" if kind == "qwen3_moe" else "intermediate_size"):
        raise ModelLoadError(f"a {kind} config needs num_experts (or num_local_experts), num_experts_per_tok and "
                             f"{'moe_intermediate_size' if kind == 'qwen3_moe' else 'intermediate_size'}")
    values = {"num_experts": int(experts), "mlp_only_layers": tuple(config.get("mlp_only_layers") or ())}
    if kind == "mixtral":
        values |= {"moe_intermediate_size": config.get("intermediate_size"), "norm_topk_prob": True}
    return values


def _standard_rope_scaling(config: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any] | None:
    """`rope_scaling` as transformers standardises it for these architectures: its type under `rope_type` (older files
    say `type`); for the types that scale from a pretraining length, `original_max_position_embeddings` (the model's
    own length where it names none: a top-level one, as Phi-3 writes it, is not read by Llama or Qwen2). Phi-3 reads
    its types `su` and `yarn` as longrope, and its top-level `original_max_position_embeddings` (4096 where absent)
    over the one inside. None for the default. (`partial_rotary_factor` is a field of its own: `ModelArgs`.)"""
    scaling = dict(scaling)
    scaling.pop("partial_rotary_factor", None)
    kind = scaling.setdefault("rope_type", scaling.get("type", "default"))
    phi3 = config.get("model_type") == "phi3"
    if phi3 and kind in ("su", "yarn"):
        kind = scaling["rope_type"] = "longrope"
    if kind == "default":
        return None
    if phi3 and kind == "longrope":
        scaling["original_max_position_embeddings"] = config.get("original_max_position_embeddings", PHI3_ORIGINAL)
    if kind in ("llama3", "yarn", "longrope"):
        scaling.setdefault("original_max_position_embeddings",
                           config.get("max_position_embeddings", ModelArgs.max_position_embeddings))
    return scaling
