"""The contract every engine (MLX, torch CPU, CUDA, Intel XPU) meets."""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Protocol

from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask


class GeneratesText(Protocol):
    """What running a task needs of an engine (or of a ring's first stage): its generate."""

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        """Stream the answer; the last chunk carries finish_reason, usage and timings."""
        ...


class Engine(GeneratesText, Protocol):
    context_length: int

    @property
    def name(self) -> str: ...

    def warmup(self) -> None:
        """Compile / capture / touch everything once, so that no request pays for it."""
        ...

    def close(self) -> None: ...


def run_warmup_request(engine: GeneratesText) -> None:
    """One short greedy generation, read to the end, so the first real request pays no first-call costs."""
    task = TextGenerationTask(prompt="Hello", max_tokens=2, sampling=SamplingParams(temperature=0))
    deque(engine.generate(task), maxlen=0)
