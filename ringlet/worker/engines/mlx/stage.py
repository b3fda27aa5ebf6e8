"""One stage of a ring on the MLX engine: layers [start, end) of an mlx-lm model and their KV cache.

It meets the pipeline's `StageModel` contract, so an MLX stage can be first, middle or last of any ring,
next to torch stages: torch tensors come in and go out (hidden states as float32, last-position logits),
converted through numpy; inside, the layers compute in MLX in the stage's precision.

A stage runs mlx-lm's own forward over its part of the layer list (`keep_layers`), so whatever a model does around
its layers (scaled embeddings, position embeddings, the final norm, a scaled or soft-capped head) is mlx-lm's: for
the step, a stage that is not first has its first layer take the hidden states the ring passed in, and a stage that
is not last stops after its last layer, taking what it computed. Any mlx-lm model that exposes its layer list
(`decoder_layers`) splits this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ringlet.models.loader import resolve_model_path
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.config import DEFAULT_MAX_CONTEXT
from ringlet.shared.errors import ModelLoadError
from ringlet.worker.engines.mlx.engine import (
    _dtype,
    _import_mlx,
    decoder_layers,
    load_mlx_model,
    model_shape,
    rewind_cache,
)


class MlxStage:
    """Layers [start, end) on MLX with mlx-lm's KV cache for them."""

    engine = "mlx"

    def __init__(self, model: Any, tokenizer: Tokenizer, config: dict[str, Any], start: int, end: int,
                 dtype: Any, max_context: int = DEFAULT_MAX_CONTEXT) -> None:
        self.mx, self._cache_module = _import_mlx()
        shape = model_shape(config)
        self.model, self.tokenizer = model, tokenizer
        self.hidden_size, self.vocab_size = shape.hidden_size, shape.vocab_size
        self.context_length = min(shape.context_length, max_context)
        self.is_first, self.is_last = start == 0, end == shape.num_layers
        self.device = torch.device("cpu")  # its logits come back as float32 host tensors, sampled there
        self._compute_dtype = dtype
        self._layers = decoder_layers(model)
        self.cache = self._new_cache()

    @classmethod
    def load(cls, model: str | Path | None, start: int, end: int, precision: str = "auto",
             max_context: int = DEFAULT_MAX_CONTEXT) -> MlxStage:
        mx, _ = _import_mlx()
        dtype = _dtype(mx, precision)
        mlx_model, tokenizer, config = load_mlx_model(resolve_model_path(model), dtype, start, end)
        return cls(mlx_model, tokenizer, config, start, end, dtype, max_context)

    def _new_cache(self) -> list[Any]:
        cache = self._cache_module.make_prompt_cache(self.model)
        if len(cache) != len(self._layers):
            raise ModelLoadError(f"mlx-lm's {type(self.model).__module__.rsplit('.', 1)[-1]} model makes "
                                 f"{len(cache)} caches for a stage of {len(self._layers)} layers (its layers are not "
                                 "one cache each), so a ring cannot split it into stages; run it on one node")
        return cache

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Token ids [1, L] on the first stage, float32 hidden states [1, L, H] elsewhere; returns hidden states,
        or on the last stage the logits of the last position [1, V]."""
        mx = self.mx
        if start == 0:  # a fresh cache: a rotating one cannot always be trimmed back to 0
            self.cache = self._new_cache()
        rewind_cache(self._cache_module, self.cache, start)
        if self.is_first:
            ids, hidden = mx.array(x.numpy()), None
        else:
            ids, hidden = mx.zeros(x.shape[:2], dtype=mx.int32), mx.array(x.numpy()).astype(self._compute_dtype)
        first, last = self._layers[0], self._layers[-1]
        entry = first if hidden is None else _Entry(first, hidden)  # the stage's first layer for this step
        if len(self._layers) == 1:
            self._layers[0] = entry if self.is_last else _Exit(entry)
        else:
            self._layers[0] = entry
            self._layers[-1] = last if self.is_last else _Exit(last)
        try:
            out = self.model(ids, cache=self.cache)[:, -1]
        except _StageOutput as stopped:
            out = stopped.hidden
        finally:
            self._layers[0], self._layers[-1] = first, last
        out = out.astype(mx.float32)
        mx.eval(out)
        return torch.from_numpy(np.array(out, copy=True))


class _StageOutput(Exception):
    """What the stage's last layer computed, raised past the rest of the model's forward."""

    def __init__(self, hidden: Any) -> None:
        super().__init__("the stage's last layer has run")
        self.hidden = hidden


class _Wrapped:
    """A layer of the stage for one step: the model's forward still reads the layer's own attributes."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)


class _Entry(_Wrapped):
    """The stage's first layer, taking the ring's hidden states in place of what the model computed before it."""

    def __init__(self, layer: Any, hidden: Any) -> None:
        super().__init__(layer)
        self.hidden = hidden

    def __call__(self, _: Any, *args: Any, **kwargs: Any) -> Any:
        return self.layer(self.hidden, *args, **kwargs)


class _Exit(_Wrapped):
    """The stage's last layer, ending the model's forward with its output."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*args, **kwargs)
        if not hasattr(out, "shape"):
            raise ModelLoadError(f"a layer of mlx-lm's model returned {type(out).__name__}, not hidden states, so a "
                                 "ring cannot split it into stages; run it on one node")
        raise _StageOutput(out)
