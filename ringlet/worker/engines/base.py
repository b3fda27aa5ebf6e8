"""The contract every engine (MLX, torch CPU, CUDA, Intel XPU) meets."""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Protocol

from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask


class Engine(Protocol):
    name: str
    context_length: int

    def warmup(self) -> float:
        """Compile / capture / touch everything once; returns seconds spent."""
        ...

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        """Stream the answer; the last chunk carries finish_reason, usage and timings."""
        ...

    def close(self) -> None: ...


def run_warmup_request(engine: Engine) -> None:
    """One short greedy generation, read to the end, so the first real request pays no first-call costs."""
    task = TextGenerationTask(prompt="Hello", max_tokens=2, sampling=SamplingParams(temperature=0))
    deque(engine.generate(task), maxlen=0)
