"""One stage of a ring on the MLX engine: layers [start, end) of an mlx-lm model and their KV cache.

It meets the pipeline's `StageModel` contract, so an MLX stage can be first, middle or last of any ring,
next to torch stages: torch tensors come in and go out (hidden states as float32, last-position logits),
converted through numpy; inside, the layers compute in MLX in the stage's precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ringlet.models.loader import resolve_model_path
from ringlet.models.registry import model_args
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.config import DEFAULT_MAX_CONTEXT
from ringlet.worker.engines.mlx.engine import _dtype, _import_mlx, load_mlx_model, rewind_cache


class MlxStage:
    """Layers [start, end) on MLX with one mlx-lm KV cache per layer."""

    engine = "mlx"

    def __init__(self, model: Any, tokenizer: Tokenizer, config: dict[str, Any], start: int, end: int,
                 dtype: Any, max_context: int = DEFAULT_MAX_CONTEXT) -> None:
        self.mx, self._cache_module = _import_mlx()
        from mlx_lm.models.base import create_attention_mask

        self._mask = create_attention_mask
        args = model_args(config)
        self.model, self.tokenizer = model, tokenizer
        self.hidden_size, self.vocab_size = args.hidden_size, args.vocab_size
        self.context_length = min(args.context_length, max_context)
        self.is_first, self.is_last = start == 0, end == args.num_hidden_layers
        self.device = torch.device("cpu")  # its logits come back as float32 host tensors, sampled there
        self._compute_dtype = dtype
        self.cache = self._cache_module.make_prompt_cache(model)

    @classmethod
    def load(cls, model: str | Path | None, start: int, end: int, precision: str = "auto",
             max_context: int = DEFAULT_MAX_CONTEXT) -> MlxStage:
        mx, _ = _import_mlx()
        dtype = _dtype(mx, precision)
        mlx_model, tokenizer, config = load_mlx_model(resolve_model_path(model), dtype, start, end)
        return cls(mlx_model, tokenizer, config, start, end, dtype, max_context)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Token ids [1, L] on the first stage, float32 hidden states [1, L, H] elsewhere; returns hidden states,
        or on the last stage the logits of the last position [1, V]."""
        mx, inner = self.mx, self.model.model
        if start == 0:  # a fresh cache: a rotating one cannot always be trimmed back to 0
            self.cache = self._cache_module.make_prompt_cache(self.model)
        rewind_cache(self._cache_module, self.cache, start)
        h = mx.array(x.numpy())
        h = inner.embed_tokens(h) if self.is_first else h.astype(self._compute_dtype)
        window = getattr(inner, "sliding_window", None)
        for layer, cache in zip(inner.layers, self.cache):
            sliding = getattr(layer, "use_sliding", False)
            h = layer(h, self._mask(h, cache, window_size=window if sliding else None), cache=cache)
        if self.is_last:
            h = inner.norm(h[:, -1:])
            h = (inner.embed_tokens.as_linear(h) if "lm_head" not in self.model else self.model.lm_head(h))[:, -1]
        out = h.astype(mx.float32)
        mx.eval(out)
        return torch.from_numpy(np.array(out, copy=True))

