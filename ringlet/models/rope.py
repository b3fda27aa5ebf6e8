"""Rotary position embeddings: the inverse frequencies of each `rope_scaling` type and the factor that scales cos and
sin, computed as Hugging Face transformers does (`modeling_rope_utils.py`), so that logits match it at every position.

Two types depend on the sequence length in transformers, which recomputes the frequencies as a sequence grows. A
KV cache keeps keys rotated by the frequencies of the step that wrote them, so here the choice is made once, by the
context a model serves (`Transformer.context_length`, the instance's context window):
- longrope takes its long factors when that context exceeds `original_max_position_embeddings`, for every position.
  transformers takes the short ones while the sequence is no longer than that length; so with a context past it, a
  prompt shorter than that length is rotated as transformers would rotate it in a longer sequence.
- dynamic (NTK) scales its base for that context where it exceeds `max_position_embeddings`; a served context never
  does (it is capped by the model's own), so it rotates as the default does, as transformers does at those lengths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ringlet.models.config import ModelArgs
from ringlet.shared.errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
REQUIRED_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "yarn": ("original_max_position_embeddings",),
                 "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    scaling = scaling or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def rope_frequencies(args: ModelArgs, context: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2] in float32, the factor cos and sin are multiplied by) of a model that
    serves `context` positions (rotary_dim: head_dim, or its leading share with a partial_rotary_factor). Computed on
    the host whatever the default device: a model built on the meta device checks its scaling with them, and
    torch.arange on the meta device goes through torch._refs, which imports torch._dynamo."""
    with torch.device("cpu"):
        return _frequencies(args, context)


def _frequencies(args: ModelArgs, context: int) -> tuple[torch.Tensor, float]:
    scaling = args.rope_scaling or {}
    kind = rope_type(scaling)
    missing = [key for key in REQUIRED_KEYS.get(kind, ()) if scaling.get(key) is None]
    if missing:
        raise ModelLoadError(f"rope_scaling of type {kind!r} is missing {', '.join(missing)}")
    dim, base = args.rotary_dim, args.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if kind == "default":
        return (1.0 / base**exponents).float(), 1.0
    if kind == "linear":
        return (1.0 / base**exponents / scaling["factor"]).float(), 1.0
    if kind == "dynamic":
        factor, limit = scaling["factor"], args.max_position_embeddings
        longest = max(context, limit)
        base = base * (factor * longest / limit - (factor - 1)) ** (dim / (dim - 2))
        return (1.0 / base**exponents).float(), 1.0
    if kind == "llama3":
        return _llama3(1.0 / base**exponents, scaling).float(), 1.0
    if kind == "yarn":
        return _yarn(args, scaling)
    if kind == "longrope":
        return _longrope(args, scaling, context)
    raise ModelLoadError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


def _llama3(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (the paper's eq. 21): 0.1 * mscale * ln(factor) + 1, and 1 without scaling."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(args: ModelArgs, scaling: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
    """Frequencies past the original length's `beta_slow` rotations interpolated by `factor`, those of more than
    `beta_fast` rotations kept, a linear ramp between; cos and sin scaled by the attention factor."""
    dim, base = args.rotary_dim, args.rope_theta
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or args.max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                     else yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # the share of each frequency left as it is (extrapolated)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (inv_freq / factor * (1 - kept) + inv_freq * kept).float(), float(attention)


def _longrope(args: ModelArgs, scaling: Mapping[str, Any], context: int) -> tuple[torch.Tensor, float]:
    dim = args.rotary_dim
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or args.max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    chosen = "long_factor" if context > original else "short_factor"
    factors = torch.tensor(scaling[chosen], dtype=torch.float64)
    if factors.shape != (dim // 2,):
        rotated = f"head_dim {dim}" if dim == args.head_dim else f"a rotary part of {dim} of head_dim {args.head_dim}"
        raise ModelLoadError(f"rope_scaling's {chosen} has {factors.numel()} values; {rotated} needs {dim // 2}")
    inv_freq = 1.0 / (factors * args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return inv_freq.float(), float(attention)


def rope_tables(args: ModelArgs, context: int, positions: int, dtype: torch.dtype,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, rotary_dim] (rotate-half layout) of positions 0..positions-1, scaled by the type's
    attention factor, in `dtype` (computed in float32 as transformers does, then cast)."""
    inv_freq, attention = rope_frequencies(args, context)
    freqs = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv_freq.to(device))
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)
