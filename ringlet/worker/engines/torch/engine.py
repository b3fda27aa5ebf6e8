"""The torch engine: one whole model (a single stage) on a CPU or CUDA device."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ringlet.models.loader import LoadedStage, load_stage
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.generate import TextGenerator

DEFAULT_MAX_CONTEXT = 8192


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TorchEngine:
    name = "torch"

    def __init__(self, stage: LoadedStage, device: torch.device, max_context: int = DEFAULT_MAX_CONTEXT) -> None:
        self.stage, self.device = stage, device
        self.context_length = min(stage.args.context_length, max_context)
        self.cache = stage.model.make_cache(1, self.context_length)
        self.generator = TextGenerator(
            self._forward, stage.tokenizer, self.context_length, stage.args.vocab_size, device
        )

    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
             max_context: int = DEFAULT_MAX_CONTEXT) -> "TorchEngine":
        dev = torch.device(device)
        stage = load_stage(model, dtype=dtype or default_dtype(dev), device=dev)
        return cls(stage, dev, max_context)

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.stage.tokenizer

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        logits = self.stage.model(ids, self.cache, start, last_logits_only=True)
        self.cache.offset = start + ids.shape[1]
        return logits[:, -1]

    def warmup(self) -> float:
        """One short generation, so the first request doesn't pay for lazy initialisation."""
        began = time.perf_counter()
        task = TextGenerationTask(prompt="Hello", max_tokens=2, sampling=SamplingParams(temperature=0))
        for _ in self.generate(task):
            pass
        return time.perf_counter() - began

    def generate(self, task: TextGenerationTask) -> Iterator[GenerationChunk]:
        with torch.inference_mode():
            yield from self.generator.generate(task)

    def close(self) -> None:
        del self.cache
