"""The torch engine: one whole model (a single stage) on a CPU or CUDA device."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ringlet.models.loader import LoadedStage, load_stage
from ringlet.models.quant import cpu_supports_bf16, quantize_int4, quantize_int8
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.torch.cuda_graphs import GraphedDecoder
from ringlet.worker.engines.torch.generate import TextGenerator

DEFAULT_MAX_CONTEXT = 8192
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16,
           "int4": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on GPUs; int8 weights with bf16 activations on CPUs with native bf16 (int4 where the file
    itself is stored in 4 bits: see `load_torch_stage`), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"precision {precision} runs on CPUs only; use bf16 or fp16 on {device.type}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "int8" if cpu_supports_bf16() else "fp32"
    return "bf16"


def load_torch_stage(model: str | Path | None, start: int = 0, end: int | None = None, precision: str = "auto",
                     device: torch.device = torch.device("cpu")) -> tuple[LoadedStage, str]:
    """Layers [start, end) in `precision`, weight-only quantised for int8 / int4; returns the precision used.

    auto on a CPU picks int4 when the file stores the stage's linears in 4 bits (GGUF Q4_0 / Q4_1): its own
    codes run as they are, so nothing is rounded twice and half of int8's bytes are read per token.
    """
    resolved = resolve_precision(precision, device)
    maybe_int4 = resolved == "int4" or (precision == "auto" and resolved == "int8")
    stage = load_stage(model, start, end, dtype=_DTYPES[resolved], device=device, keep_groups=maybe_int4)
    if resolved == "int4" or (maybe_int4 and stage.groups):
        quantize_int4(stage.model, _DTYPES[resolved], stage.groups)
        resolved, stage.groups = "int4", {}
    elif resolved == "int8":
        quantize_int8(stage.model, _DTYPES[resolved])
    return stage, resolved


class TorchEngine:
    name = "torch"

    def __init__(self, stage: LoadedStage, device: torch.device, max_context: int = DEFAULT_MAX_CONTEXT,
                 cuda_graphs: bool | None = None, compile: bool = True) -> None:
        self.stage, self.device = stage, device
        self.precision = str(next(stage.model.parameters()).dtype).removeprefix("torch.")
        self.context_length = min(stage.args.context_length, max_context)
        self.cache = stage.model.make_cache(1, self.context_length)
        self.graphs: GraphedDecoder | None = None
        if cuda_graphs if cuda_graphs is not None else device.type == "cuda":
            self.graphs = GraphedDecoder(stage.model, self.cache, self.context_length, compile=compile)
        self.generator = TextGenerator(
            self._forward, stage.tokenizer, self.context_length, stage.args.vocab_size, device,
            lookahead=device.type == "cuda",
        )

    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "cpu", precision: str = "auto",
             max_context: int = DEFAULT_MAX_CONTEXT, **options: bool) -> TorchEngine:
        dev = torch.device(device)
        stage, precision = load_torch_stage(model, precision=precision, device=dev)
        engine = cls(stage, dev, max_context, **options)
        engine.precision = precision
        return engine

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.stage.tokenizer

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if self.graphs is not None and ids.shape[1] == 1:
            self.cache.offset = start + 1
            return self.graphs(ids, start)
        logits = self.stage.model(ids, self.cache, start, last_logits_only=True)
        self.cache.offset = start + ids.shape[1]
        return logits[:, -1]

    def warmup(self) -> float:
        """Capture the decode graphs (CUDA) and run one short generation, so no request pays for them."""
        began = time.perf_counter()
        if self.graphs is not None:
            self.graphs.capture_all()
        run_warmup_request(self)
        return time.perf_counter() - began

    def generate(self, task: TextGenerationTask) -> Iterator[GenerationChunk]:
        with torch.inference_mode():
            yield from self.generator.generate(task)

    def close(self) -> None:
        del self.cache
