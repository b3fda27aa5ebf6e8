"""The MLX engine: mlx-lm's model definitions (Metal on Apple Silicon, the CPU elsewhere).

A Hugging Face directory loads through mlx-lm itself. mlx-lm cannot read llama.cpp's quantised GGUF
files (its loader takes safetensors), so a GGUF model goes through ringlet's GGUF reader: dequantised
tensors under Hugging Face names, which are exactly the names mlx-lm's models expect.

The loop is ringlet's shared TextGenerator (same sampling, stop strings and chunks as every engine);
each step hands one row of logits from MLX to torch, a copy of vocab_size floats.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ringlet.models.loader import resolve_model_path
from ringlet.models.registry import model_args
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.engines.engine_utils import EngineUnavailableError
from ringlet.worker.engines.torch.generate import TextGenerator

DEFAULT_MAX_CONTEXT = 8192
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# model_type -> mlx_lm.models module, where the name differs (as mlx_lm.utils.MODEL_REMAPPING)
MLX_MODULES = {"mistral": "llama"}


def _import_mlx() -> tuple[Any, Any]:
    try:
        import mlx.core as mx
        import mlx_lm.models.cache as mlx_cache
    except ImportError as e:
        raise EngineUnavailableError(
            f"the mlx engine needs mlx and mlx-lm ({e}); fix: pip install 'ringlet[mlx]' "
            "(on Linux: pip install mlx mlx-cpu mlx-lm)", engine="mlx",
        ) from e
    return mx, mlx_cache


def _dtype(mx: Any, precision: str) -> Any:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":  # half precision where Metal runs it natively; fp32 on the CPU
        precision = "bf16" if mx.metal.is_available() else "fp32"
    return {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[precision]


def load_mlx_model(path: Path, dtype: Any) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """(mlx-lm model, ringlet tokenizer, config) for a Hugging Face directory or a GGUF file."""
    mx, _ = _import_mlx()
    if path.is_dir():
        from mlx_lm.utils import load_model

        model, config = load_model(path)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        from ringlet.models.gguf_loader import GGUFModel

        gguf = GGUFModel.open(path)
        config = dict(gguf.config)
        args = model_args(config)  # refuses architectures ringlet does not know
        module = importlib.import_module(f"mlx_lm.models.{MLX_MODULES.get(args.model_type, args.model_type)}")
        model = module.Model(module.ModelArgs.from_dict(config))
        weights = gguf.load_state_dict(0, args.num_hidden_layers)
        model.load_weights([(name, mx.array(w.numpy())) for name, w in model.sanitize(weights).items()])
        tokenizer = gguf.tokenizer()
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, tokenizer, config


class MlxEngine:
    name = "mlx"

    def __init__(self, model: Any, tokenizer: Tokenizer, config: dict[str, Any],
                 max_context: int = DEFAULT_MAX_CONTEXT) -> None:
        self.mx, self._cache_module = _import_mlx()
        self.model, self.tokenizer = model, tokenizer
        args = model_args(config)
        self.context_length = min(args.context_length, max_context)
        self.cache = self._cache_module.make_prompt_cache(model)
        self.generator = TextGenerator(self._forward, tokenizer, self.context_length, args.vocab_size, "cpu")

    @classmethod
    def load(cls, model: str | Path | None = None, precision: str = "auto",
             max_context: int = DEFAULT_MAX_CONTEXT) -> MlxEngine:
        mx, _ = _import_mlx()
        mlx_model, tokenizer, config = load_mlx_model(resolve_model_path(model), _dtype(mx, precision))
        return cls(mlx_model, tokenizer, config, max_context)

    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        # TextGenerator reuses a cached prefix by restarting at `start`: drop what lies past it.
        cached = self.cache[0].offset
        if cached > start:
            self._cache_module.trim_prompt_cache(self.cache, cached - start)
        assert self.cache[0].offset == start, f"cache holds {self.cache[0].offset} positions, step starts at {start}"
        logits = self.model(self.mx.array(ids.numpy()), cache=self.cache)[:, -1, :].astype(self.mx.float32)
        self.mx.eval(logits)
        return torch.from_numpy(np.array(logits, copy=True))

    def warmup(self) -> float:
        began = time.perf_counter()
        task = TextGenerationTask(prompt="Hello", max_tokens=2, sampling=SamplingParams(temperature=0))
        for _ in self.generate(task):
            pass
        return time.perf_counter() - began

    def generate(self, task: TextGenerationTask) -> Iterator[GenerationChunk]:
        return self.generator.generate(task)

    def close(self) -> None:
        self.cache = []
