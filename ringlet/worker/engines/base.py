"""The contract every engine (MLX, torch CPU, CUDA, Intel XPU) meets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from ringlet.shared.tasks import GenerationChunk, TextGenerationTask


class Engine(Protocol):
    name: str
    context_length: int

    def warmup(self) -> float:
        """Compile / capture / touch everything once; returns seconds spent."""
        ...

    def generate(self, task: TextGenerationTask) -> Iterator[GenerationChunk]:
        """Stream the answer; the last chunk carries finish_reason, usage and timings."""
        ...

    def close(self) -> None: ...
