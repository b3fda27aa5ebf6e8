"""Models only the MLX engine runs: architectures mlx-lm has a module for and ringlet's torch models do not build.

The torch engines (cpu, cuda, ipex) compute ringlet's own model definitions (`registry.py`), so they take the
architectures those cover. The MLX engine computes mlx-lm's, so for it a `model_type` is accepted where mlx-lm has a
module for it (`mlx_lm.models.<name>`, after mlx-lm's own remapping of names). ringlet's `ModelArgs` does not parse
such a config, so its shape is read under the names Hugging Face configs use (`config_shape`); its card's parameters
come from the checkpoint itself (`catalog.mlx_only_card`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ringlet.models.config import ModelArgs
from ringlet.shared.errors import ModelLoadError

# the first of these names a config has gives the value (GPT-2 style configs: n_layer, n_embd, ...)
_NAMES = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim", "model_dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "context_length": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size"),
}
DEFAULT_CONTEXT = 4096  # the context window of a config naming none (mlx-lm sets no limit; a KV cache needs one)


@dataclass(frozen=True)
class ModelShape:
    """What the MLX engine and placement need of any model's config."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    tie_word_embeddings: bool
    intermediate_size: int | None = None


def mlx_lm_module(config: dict[str, Any]) -> str | None:
    """The mlx-lm module that builds this config's model (mlx-lm's remapping of names applied), or None when mlx-lm
    has none or is not installed here."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.replace("_", "").replace("-", "").isalnum():
        return None
    if importlib.util.find_spec("mlx_lm") is None:
        return None
    from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING

    architectures = config.get("architectures") or ()
    remapped = next((MODEL_ARCHITECTURE_REMAPPING[(model_type, a)] for a in architectures
                     if (model_type, a) in MODEL_ARCHITECTURE_REMAPPING), None)
    name = remapped or MODEL_REMAPPING.get(model_type, model_type)
    return name if importlib.util.find_spec(f"mlx_lm.models.{name}") is not None else None


def check_mlx_architecture(config: dict[str, Any]) -> str:
    """The mlx-lm module of the config's model; ModelLoadError saying why when the MLX engine cannot build it."""
    module = mlx_lm_module(config)
    if module is not None:
        return module
    model_type = config.get("model_type")
    if importlib.util.find_spec("mlx_lm") is None:
        raise ModelLoadError(f"architecture {model_type!r}: the MLX engine needs mlx-lm, which is not installed here; "
                             "fix: pip install 'ringlet[mlx]'")
    raise ModelLoadError(f"architecture {model_type!r} is not one mlx-lm has a model for (no mlx_lm.models module "
                         "of that name), so the MLX engine cannot run it; a newer mlx-lm may have it")


def config_shape(config: dict[str, Any]) -> ModelShape:
    """The shape of a config ringlet's `ModelArgs` does not parse, read under the names Hugging Face configs use (a
    multimodal config's `text_config` for its language model)."""
    text = {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config
    num_layers, hidden = _field(text, "num_layers"), _field(text, "hidden_size")
    heads = _field(text, "num_attention_heads")
    kv_heads = _field(text, "num_key_value_heads", 1 if text.get("multi_query") else heads)
    vocab = text.get("vocab_size") or text.get("padded_vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise ModelLoadError(f"config.json of model_type {config.get('model_type')!r} names no vocab_size")
    head_dim = text.get("head_dim") or hidden // heads
    intermediate = next((text[n] for n in _NAMES["intermediate_size"] if isinstance(text.get(n), int)), None)
    return ModelShape(model_type=str(config.get("model_type")), num_layers=num_layers, hidden_size=hidden,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=int(head_dim),
                      vocab_size=vocab, context_length=_field(text, "context_length", DEFAULT_CONTEXT),
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
                      intermediate_size=intermediate)


def shape_of_args(args: ModelArgs) -> ModelShape:
    return ModelShape(model_type=args.model_type, num_layers=args.num_hidden_layers, hidden_size=args.hidden_size,
                      num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                      head_dim=args.head_dim, vocab_size=args.vocab_size, context_length=args.context_length,
                      tie_word_embeddings=args.tie_word_embeddings, intermediate_size=args.intermediate_size)


def _field(config: dict[str, Any], name: str, default: int | None = None) -> int:
    for key in _NAMES[name]:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    if default is not None:
        return default
    raise ModelLoadError(f"config.json of model_type {config.get('model_type')!r} names no {name} (looked for "
                         f"{', '.join(_NAMES[name])})")
