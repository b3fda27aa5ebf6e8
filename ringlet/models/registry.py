"""Architectures by `model_type`, and building a model stage from a config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import torch
from torch import nn

from ringlet.models.config import ModelArgs
from ringlet.models.hf_quant import quant_scheme
from ringlet.models.mlx_only import mlx_lm_module
from ringlet.shared.errors import ModelLoadError

StageBuilder = Callable[[ModelArgs, int, int], nn.Module]
_ARCHITECTURES: dict[str, StageBuilder] = {}


class _LoadsWeights(Protocol):
    """What `build_stage` needs of a built stage besides nn.Module (every architecture's Transformer has it)."""

    def load_weights(self, weights: Mapping[str, torch.Tensor], dtype: torch.dtype = ...,
                     device: torch.device | str | None = ...,
                     finish_layer: Callable[[nn.Module, int], None] | None = ..., int8_ends: bool = ...,
                     int4_embedding: bool = ...) -> None: ...


def register(model_type: str) -> Callable[[StageBuilder], StageBuilder]:
    def add(builder: StageBuilder) -> StageBuilder:
        _ARCHITECTURES[model_type] = builder
        return builder
    return add


def supported_architectures() -> list[str]:
    from ringlet.models import gemma, gpt_oss, llama, mistral, moe, phi3, qwen2, qwen3  # noqa: F401  (each registers itself)

    return sorted(_ARCHITECTURES)


def model_args(config: dict[str, Any]) -> ModelArgs:
    model_type = config.get("model_type")
    supported = supported_architectures()
    if model_type not in supported:
        raise ModelLoadError(f"architecture {model_type!r} is not supported; supported: {', '.join(supported)}"
                             f"{_mlx_hint(config)}")
    # refuses a quantisation ringlet does not read: as plain weights it would give wrong answers
    if quant_scheme(config) is not None and model_type == "phi3":
        raise ModelLoadError("a quantised phi3 checkpoint (config.json's quantization_config) is not supported: its "
                             "q/k/v and gate/up are quantised as fused tensors, which ringlet reads only unquantised; "
                             "use the model's bf16 checkpoint")
    return ModelArgs.from_dict(config)


def _mlx_hint(config: dict[str, Any]) -> str:
    if mlx_lm_module(config) is None:
        return ""
    return (" (by ringlet's torch engines); mlx-lm has a model for it, so the MLX engine runs it: start the node or "
            "`ringlet run` with --engine mlx")


def build_stage(
    args: ModelArgs, start: int = 0, end: int | None = None, weights: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    finish_layer: Callable[[nn.Module, int], None] | None = None, int8_ends: bool = False,
    int4_embedding: bool = False,
) -> nn.Module:
    """Build layers [start, end); with weights, no memory is spent on a random initialisation. The weights are
    read layer by layer, `finish_layer(layer, global index)` running after each, and with `int8_ends` the embedding
    and lm_head are int8, the embedding int4 with `int4_embedding` too where it is not the lm_head (see
    `Transformer.load_weights`)."""
    supported = supported_architectures()
    builder = _ARCHITECTURES.get(args.model_type)
    if builder is None:
        raise ModelLoadError(f"architecture {args.model_type!r} is not supported; supported: {', '.join(supported)}")
    end = args.num_hidden_layers if end is None else end
    if weights is None:
        return builder(args, start, end).to(dtype=dtype, device=device)
    with torch.device("meta"):
        model = builder(args, start, end)
    cast(_LoadsWeights, model).load_weights(weights, dtype=dtype, device=device, finish_layer=finish_layer,
                                            int8_ends=int8_ends, int4_embedding=int4_embedding)
    return model.eval()
