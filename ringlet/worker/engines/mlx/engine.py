"""The MLX engine: mlx-lm's model definitions (Metal on Apple Silicon, the CPU elsewhere).

A Hugging Face directory loads through mlx-lm itself, so the engine runs whatever architecture mlx-lm has a model
for (`models/mlx_only.py`), not only those of ringlet's torch models. mlx-lm cannot read llama.cpp's quantised GGUF
files (its loader takes safetensors), so a GGUF model goes through ringlet's GGUF reader: dequantised tensors under
Hugging Face names, which are exactly the names mlx-lm's models expect (for the architectures that reader knows).

A node serves an MLX instance through mlx-lm's batch generator (`batch.py`); `ringlet run` and `ringlet bench`
go through ringlet's shared TextGenerator (same sampling, stop strings and chunks as every engine), each step
handing one row of logits from MLX to torch, a copy of vocab_size floats.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ringlet.models import safetensors_loader
from ringlet.models.loader import resolve_model_path
from ringlet.models.mlx_only import ModelShape, check_mlx_architecture, config_shape, shape_of_args
from ringlet.models.registry import model_args
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.config import DEFAULT_MAX_CONTEXT, EngineConfig
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.instances import BoundInstance
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.engine_utils import EngineUnavailableError
from ringlet.worker.engines.torch.generate import TextGenerator

if TYPE_CHECKING:
    from ringlet.worker.engines.mlx.batch import MlxBatchGenerator

MLX_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # MLX runs the models in float types only
# model_type -> mlx_lm.models module, where the name differs (as mlx_lm.utils.MODEL_REMAPPING)
MLX_MODULES = {"mistral": "llama"}


def _import_mlx() -> tuple[Any, Any]:
    try:
        import mlx.core as mx
        import mlx_lm.models.cache as mlx_cache
    except ImportError as e:
        raise EngineUnavailableError(
            f"the mlx engine needs mlx and mlx-lm ({e}); fix: pip install 'ringlet[mlx]' (on Linux it brings "
            "mlx[cpu])", engine="mlx",
        ) from e
    return mx, mlx_cache


def _dtype(mx: Any, precision: str) -> Any:
    if precision not in MLX_PRECISIONS:
        raise ValueError(f"the mlx engine runs precision {', '.join(MLX_PRECISIONS)}, not {precision!r}")
    if precision == "auto":  # half precision where Metal runs it natively; fp32 on the CPU
        precision = "bf16" if mx.metal.is_available() else "fp32"
    return {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[precision]


def load_mlx_model(path: Path, dtype: Any, start: int = 0,
                   end: int | None = None) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """(mlx-lm model, ringlet tokenizer, config) for a Hugging Face directory or a GGUF file.

    With a layer range the model keeps layers [start, end) only (see `keep_layers`); the weights of the
    others are never read: mlx-lm loads lazily, and the GGUF reader reads the range alone, a tensor at a time.
    """
    mx, _ = _import_mlx()
    if path.is_dir():
        from mlx_lm.utils import load_model

        check_mlx_architecture(safetensors_loader.read_config(path))  # says why where mlx-lm has no such model
        try:
            model, config = load_model(path, lazy=True)
        except (ValueError, FileNotFoundError) as e:  # mlx-lm's word on a checkpoint it cannot read
            raise ModelLoadError(f"mlx-lm cannot load {path}: {e}") from None
        if (start, end) != (0, None):
            keep_layers(model, start, len(decoder_layers(model)) if end is None else end, dtype)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        from ringlet.models.gguf_loader import GGUFModel

        gguf = GGUFModel.open(path)
        config = dict(gguf.config)
        args = model_args(config)  # refuses architectures ringlet does not know
        end = args.num_hidden_layers if end is None else end
        module = importlib.import_module(f"mlx_lm.models.{MLX_MODULES.get(args.model_type, args.model_type)}")
        model = module.Model(module.ModelArgs.from_dict(config))  # lazy: dropped layers never take memory
        keep_layers(model, start, end, dtype)
        weights = {}
        for name, tensor in gguf.lazy_state_dict(start, end).items():  # read one tensor at a time
            weights[_renumber(name, start)] = converted = mx.array(tensor.numpy()).astype(dtype)
            mx.eval(converted)  # in `dtype` now: the fp32 copy goes before the next tensor is read
        model.load_weights(list(model.sanitize(weights).items()))
        tokenizer = gguf.tokenizer()
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, tokenizer, config


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The shape of the model: ringlet's `ModelArgs` where the torch models parse its config (their context limits
    too), else the config read under Hugging Face's names."""
    try:
        return shape_of_args(model_args(config))
    except ModelLoadError:
        return config_shape(config)


def rewind_cache(cache_module: Any, cache: list[Any], start: int) -> None:
    """Drop what the cache holds past `start`: TextGenerator reuses a cached prefix by restarting there, and a
    pipeline stage is told each step's start (0 for a new request)."""
    cached = cache[0].offset
    if cached > start:
        cache_module.trim_prompt_cache(cache, cached - start)
    assert cache[0].offset == start, f"cache holds {cache[0].offset} positions, step starts at {start}"


def decoder_layers(model: Any) -> list[Any]:
    """The list of an mlx-lm model's decoder layers: `model.layers` (most mlx-lm models' property over their inner
    model's list) or `model.model.layers`; ModelLoadError saying why where the model exposes neither."""
    for layers in (getattr(model, "layers", None), getattr(getattr(model, "model", None), "layers", None)):
        if isinstance(layers, list) and layers:
            return layers
    raise ModelLoadError(f"mlx-lm's {type(model).__module__.rsplit('.', 1)[-1]} model exposes no list of decoder "
                         "layers (model.layers or model.model.layers), so a ring cannot split it into stages; run it "
                         "on one node")


def keep_layers(model: Any, start: int, end: int, dtype: Any) -> None:
    """Cut an mlx-lm model down to layers [start, end) (see `engines/mlx/stage.py` for how a stage runs them).

    A stage that is not first has no use for the token embedding, unless it is the last and the embedding is its head
    (the model has no head of its own): each embedding outside the layers becomes zeros of `dtype`. A stage that is
    not last drops the model's head and final norm. The weights of what is dropped are never read (mlx-lm loads
    lazily)."""
    from mlx import nn
    from mlx.utils import tree_unflatten

    layers = decoder_layers(model)
    num_layers = len(layers)
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"layer range [{start}, {end}) is outside the model's {num_layers} layers")
    if (start, end) == (0, num_layers):
        return
    owner, name = next((m, n) for m in model.modules() for n, v in m.items() if v is layers)
    _check_splittable(model, owner)
    setattr(owner, name, layers[start:end])
    first, last = start == 0, end == num_layers
    heads = [n for n, child in model.children().items() if isinstance(child, (nn.Linear, nn.QuantizedLinear))]
    if not first and not (last and not heads):
        prefix = next(p for p, m in model.named_modules() if m is owner)
        embeddings = [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
                      and not p.startswith(f"{prefix}.{name}." if prefix else f"{name}.")]
        model.update_modules(tree_unflatten([(p, _no_embedding()(_width(m), dtype)) for p, m in embeddings]))
    if not last:  # the final norm (mlx-lm's models call it `norm`) and the head run on the last stage only
        for head in heads:
            delattr(model, head)
        if "norm" in owner:
            del owner.norm


def _check_splittable(model: Any, owner: Any) -> None:
    """Refuse a model whose forward indexes its layers or caches by position in the whole list (layers of several
    kinds: mlx-lm keeps the first index of each kind, `fa_idx`, `swa_idx`, ...), which a stage's part of the list
    would break."""
    kinds = {n: v for n, v in vars(owner).items() if n.endswith("_idx") and isinstance(v, int) and v != 0}
    if kinds:
        raise ModelLoadError(f"mlx-lm's {type(model).__module__.rsplit('.', 1)[-1]} model has layers of several kinds "
                             f"that it finds by their place in the whole model ({', '.join(sorted(kinds))}), so a "
                             "ring cannot split it into stages; run it on one node")


@functools.cache
def _no_embedding() -> type:
    import mlx.core as mx
    from mlx import nn

    class NoEmbedding(nn.Module):
        """Stands in for an embedding a stage does not hold: zeros of its width (the stage's first layer takes the
        hidden states the ring passes in instead)."""

        def __init__(self, width: int, dtype: Any) -> None:
            super().__init__()
            self.width, self.dtype = width, dtype

        def __call__(self, ids: Any) -> Any:
            return mx.zeros((*ids.shape, self.width), dtype=self.dtype)

    return NoEmbedding


def _width(embedding: Any) -> int:
    return int(getattr(embedding, "dims", 0) or embedding.weight.shape[-1])


def _renumber(name: str, start: int) -> str:
    """model.layers.{i}.* (global index) -> model.layers.{i - start}.* (index in the stage)."""
    prefix = "model.layers."
    if not name.startswith(prefix):
        return name
    index, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{int(index) - start}.{rest}"


class MlxEngine:
    name = "mlx"

    def __init__(self, model: Any, tokenizer: Tokenizer, config: dict[str, Any],
                 max_context: int = DEFAULT_MAX_CONTEXT) -> None:
        self.mx, self._cache_module = _import_mlx()
        self.model, self.tokenizer = model, tokenizer
        shape = model_shape(config)
        self.context_length = min(shape.context_length, max_context)
        self.cache = self._cache_module.make_prompt_cache(model)
        self.generator = TextGenerator(self._forward, tokenizer, self.context_length, shape.vocab_size, "cpu")

    @classmethod
    def load(cls, model: str | Path | None = None, config: EngineConfig = EngineConfig()) -> MlxEngine:
        mx, _ = _import_mlx()
        mlx_model, tokenizer, model_config = load_mlx_model(resolve_model_path(model), _dtype(mx, config.precision))
        return cls(mlx_model, tokenizer, model_config, config.max_context)

    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        rewind_cache(self._cache_module, self.cache, start)
        logits = self.model(self.mx.array(ids.numpy()), cache=self.cache)[:, -1, :].astype(self.mx.float32)
        self.mx.eval(logits)
        return torch.from_numpy(np.array(logits, copy=True))

    def warmup(self) -> None:
        run_warmup_request(self)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        return self.generator.generate(task)

    def batch_generator(self, max_running: int) -> MlxBatchGenerator:
        """The node's batching loop over this model (mlx-lm's batch generator; see `engines/mlx/batch.py`)."""
        from ringlet.worker.engines.mlx.batch import MlxBatchGenerator

        return MlxBatchGenerator(self, max_running)

    def close(self) -> None:
        self.cache = []


def initialize_mlx(bound: BoundInstance, config: EngineConfig) -> MlxEngine:
    """The engine of a single-stage instance on MLX (Metal on Apple Silicon, the CPU elsewhere)."""
    return MlxEngine.load(bound.instance.model, config)
