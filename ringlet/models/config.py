"""Model hyper-parameters, built from a Hugging Face style `config.json` dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ringlet.shared.errors import ModelLoadError

PHI3_ORIGINAL = 4096  # transformers' Phi3Config default of original_max_position_embeddings
GEMMA = ("gemma2", "gemma3_text")
GEMMA_ACTIVATION = "gelu_pytorch_tanh"  # Gemma's GeGLU: the tanh approximation of GELU gates the up projection


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
    # the window of the layers `layer_types` calls sliding; mistral v0.1 and phi3 name none: they serve at most this
    # many positions (`context_length`)
    sliding_window: int | None = None
    partial_rotary_factor: float = 1.0  # phi3 (Phi-4-mini): rotary on the first share of each head's dims only
    hidden_act: str = "silu"  # the gated MLP's activation: SiLU, or Gemma's gelu_pytorch_tanh (GeGLU)
    # each layer's attention, "sliding_attention" (the last `sliding_window` positions) or "full_attention"; none
    # named: every layer attends every position (gemma2, gemma3_text name them)
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5; None: head_dim's
    attn_logit_softcapping: float | None = None  # gemma2: attention logits become cap * tanh(logits / cap)
    final_logit_softcapping: float | None = None  # gemma2: and so do the output logits
    # gemma3_text: the sliding layers' own rotary base and scaling (rope_theta and rope_scaling are the full layers')
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: dict[str, Any] | None = None
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
    # gpt_oss: experts with biases, gate and up interleaved, a clamped gated activation (`swiglu_limit`); kept as
    # MXFP4 codes where the checkpoint stores them so
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702
    mxfp4_experts: bool = False

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
        if config.get("model_type") in GEMMA:
            gemma, config = _gemma(config)
            values.update(gemma)
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
        if config.get("model_type") in GEMMA:
            if values["hidden_act"] != GEMMA_ACTIVATION or config.get("mlp_bias"):
                raise ModelLoadError(f"only GeGLU MLPs without bias are supported for {config['model_type']} "
                                     f"(hidden_activation {GEMMA_ACTIVATION!r}, mlp_bias false)")
        elif config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
            raise ModelLoadError("only SiLU-gated MLPs without bias are supported (hidden_act 'silu', mlp_bias false)")
        eos = values.get("eos_token_id", [])
        values["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
        if config.get("model_type") == "qwen2":
            values.setdefault("attention_bias", True)
        if config.get("model_type") in ("qwen3", "qwen3_moe"):
            values["qk_norm"] = True
        if config.get("model_type") == "gpt_oss":
            values.setdefault("attention_bias", True)
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

    def attention_window(self, layer: int) -> int | None:
        """How many positions layer `layer` attends, the query's own and those before it; None: all of them."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

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
            h, width = self.hidden_size, self.moe_intermediate_size
            biases = 2 * width + h + 1 if self.model_type == "gpt_oss" else 0  # the experts' and the router's
            return self.num_experts * (3 * h * width + h + biases)
        return 3 * self.hidden_size * self.intermediate_size


def _gemma(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Gemma 2 / Gemma 3 settings as ModelArgs names them, transformers' defaults where a key is absent; and the
    config with the full-attention layers' rope parameters where it names them per layer type (as transformers >= 5
    writes Gemma 3's: `rope_parameters` {"full_attention": ..., "sliding_attention": ...})."""
    kind = config["model_type"]
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(f"a {kind} model with bidirectional attention (EmbeddingGemma) is not supported")
    layers = config.get("num_hidden_layers", 0)
    # transformers' default pattern: Gemma 2 alternates sliding and full layers, Gemma 3 has five sliding to one full
    pattern = 2 if kind == "gemma2" else config.get("sliding_window_pattern") or 6
    types = tuple(config.get("layer_types") or ("sliding_attention" if (i + 1) % pattern else "full_attention"
                                                for i in range(layers)))
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"layer_types must name one of 'sliding_attention' and 'full_attention' for each of the "
                             f"{layers} layers; got {list(types)}")
    capped = kind == "gemma2"  # Gemma 2 caps its logits unless its config says null
    values: dict[str, Any] = {
        "hidden_act": config.get("hidden_activation") or config.get("hidden_act") or GEMMA_ACTIVATION,
        "layer_types": types,
        "query_pre_attn_scalar": config.get("query_pre_attn_scalar") or 256,
        "attn_logit_softcapping": config.get("attn_logit_softcapping", 50.0 if capped else None),
        "final_logit_softcapping": config.get("final_logit_softcapping", 30.0 if capped else None),
        "sliding_window": config.get("sliding_window", 4096),
        "tie_word_embeddings": config.get("tie_word_embeddings", True) is not False,
        "qk_norm": kind == "gemma3_text",  # Gemma 3 normalises each head of q and k (a Gemma norm: 1 + weight)
    }
    if kind == "gemma3_text":
        rope = config.get("rope_parameters") or {}
        if "full_attention" in rope or "sliding_attention" in rope:
            full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
            config = {**config, "rope_parameters": full}
        else:  # transformers 4: the full layers' rope_theta and rope_scaling, the sliding ones' rope_local_base_freq
            full, sliding = {}, {"rope_theta": config.get("rope_local_base_freq")}
        values["rope_theta"] = float(full.get("rope_theta") or config.get("rope_theta") or 1_000_000.0)
        values["sliding_rope_theta"] = float(sliding.get("rope_theta") or 10_000.0)
        if sliding.get("rope_type", "default") != "default":
            values["sliding_rope_scaling"] = _standard_rope_scaling(config, sliding)
    return values, config


def _experts(config: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts settings as ModelArgs names them: Mixtral's and gpt_oss's experts count
    `num_local_experts` and are as wide as `intermediate_size`; Mixtral always renormalises the chosen experts' weights
    (gpt_oss's are a softmax over the chosen logits); gpt_oss names its top k `experts_per_token` in older files, and
    its layers alternate sliding-window and full attention where `layer_types` is absent (as transformers does)."""
    kind = config.get("model_type")
    if kind not in ("qwen3_moe", "mixtral", "gpt_oss"):
        return {}
    experts = config.get("num_experts", config.get("num_local_experts"))
    top_k = config.get("num_experts_per_tok", config.get("experts_per_token"))
    width = "moe_intermediate_size" if kind == "qwen3_moe" else "intermediate_size"
    if not experts or not top_k or not config.get(width):
        raise ModelLoadError(f"a {kind} config needs num_experts (or num_local_experts), num_experts_per_tok and "
                             f"{width}")
    values = {"num_experts": int(experts), "num_experts_per_tok": int(top_k),
              "mlp_only_layers": tuple(config.get("mlp_only_layers") or ())}
    if kind == "mixtral":
        values |= {"moe_intermediate_size": config.get("intermediate_size"), "norm_topk_prob": True}
    if kind == "gpt_oss":
        layers = config.get("num_hidden_layers", 0)
        types = config.get("layer_types") or ["sliding_attention" if n % 2 == 0 else "full_attention"
                                              for n in range(layers)]
        if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ModelLoadError(f"a gpt_oss config's layer_types must name 'sliding_attention' or 'full_attention' "
                                 f"for each of its {layers} layers; it has {types}")
        method = (config.get("quantization_config") or {}).get("quant_method")
        values |= {"moe_intermediate_size": config.get("intermediate_size"), "layer_types": tuple(types),
                   "swiglu_limit": float(config.get("swiglu_limit", 7.0)), "mxfp4_experts": method == "mxfp4"}
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


# the dense architectures built from the Llama block, which tensor parallelism splits (MoE, Gemma, gpt-oss blocks differ)
SHARDABLE = ("llama", "mistral", "phi3", "qwen2", "qwen3")


def shard_misfit(model_type: str, heads: int, kv_heads: int, ranks: int, intermediate_size: int | None = None
                 ) -> str | None:
    """Why `ranks` tensor-parallel ranks cannot split this model's attention heads and MLP columns, or None."""
    if ranks < 1:
        return f"tensor parallelism needs at least one rank, not {ranks}"
    if ranks == 1:
        return None
    if model_type not in SHARDABLE:
        return (f"architecture {model_type!r} cannot be split by tensor parallelism (it splits "
                f"{', '.join(SHARDABLE)}); place it as pipeline stages instead")
    if heads % ranks:
        return f"{heads} attention heads do not split over {ranks} tensor-parallel ranks; use a degree that divides {heads}"
    if kv_heads % ranks and ranks % kv_heads:
        return (f"{kv_heads} key/value heads do not split over {ranks} tensor-parallel ranks, nor repeat evenly on "
                f"them; use a degree that divides {kv_heads} or a multiple of it")
    if intermediate_size is not None and intermediate_size % ranks:
        return f"an MLP of {intermediate_size} columns does not split over {ranks} tensor-parallel ranks"
    return None

