"""IpexChain: one stage's layers split over several Intel GPUs of a node, where no one of them holds them all.

Each device runs its share of the layers as an `IpexEngine` (its own memory check, optimisation, guard and CPU
fallback); a step goes through them in layer order, the hidden states passing from one device to the next through
the host, as the guards return them. The parts' paged KV caches hold the same blocks (the fewest any part holds),
so one block table serves them all. A part that falls back to the CPU loses its cache: the step raises `CacheLost`
and every sequence is computed again through every part, the others writing the same keys and values again.

All parts live in one process, the runner's: a step's hand-over is a copy between devices, with no collective
library or rendezvous between them (those join the nodes of a ring, `net/ring.py`).
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Sequence

import torch

from ringlet.models.loader import LoadedStage
from ringlet.models.paged_cache import SequenceStep
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import run_warmup_request
from ringlet.worker.engines.ipex import IPEXTokenizerWrapper
from ringlet.worker.engines.ipex.device import ComputeDevice
from ringlet.worker.engines.ipex.engine import IpexEngine


class IpexChain:
    """A batch model (`worker/batching.py`) or a ring's stage (`worker/pipeline.py`) over `parts`, each the next
    layers on another device. It runs on "ipex" while any part is on its GPU ("cpu" once all fell back), and reports
    each part's optimisation and fallback by device where they differ."""

    device = torch.device("cpu")  # where its outputs are and the samplers run, as an IpexEngine's

    def __init__(self, parts: Sequence[IpexEngine]) -> None:
        if len(parts) < 2:
            raise ValueError("a chain has two parts or more; one part is an IpexEngine")
        if len({p.num_blocks for p in parts}) != 1 or len({p.context_length for p in parts}) != 1:
            raise ValueError("the parts of a chain hold the same KV cache blocks and context")
        if any(a.stage.end != b.stage.start for a, b in itertools.pairwise(parts)):
            raise ValueError("the parts of a chain hold contiguous layers, in order")
        self.parts = list(parts)
        first = self.parts[0]
        self.config: EngineConfig = first.config
        self.precision, self.context_length, self.vocab_size = first.precision, first.context_length, first.vocab_size
        self.num_blocks, self.block_size, self.pad_slot = first.num_blocks, first.block_size, first.pad_slot

    @property
    def tokenizer(self) -> IPEXTokenizerWrapper:
        return self.parts[0].tokenizer

    @property
    def stage(self) -> LoadedStage:
        """The first part's layers (their model's shape, and its tokenizer)."""
        return self.parts[0].stage

    @property
    def dtype(self) -> torch.dtype:
        """What a later stage's hidden states arrive in: the first part's dtype."""
        return self.parts[0].dtype

    @property
    def compute(self) -> ComputeDevice:
        """The device a ring's frames arrive on: the first part's."""
        return self.parts[0].compute

    @property
    def name(self) -> str:
        return "cpu" if all(p.name == "cpu" for p in self.parts) else "ipex"

    @property
    def optimization(self) -> str:
        return self._by_part([p.optimization for p in self.parts]) or ""

    @property
    def fallback_reason(self) -> str | None:
        return self._by_part([p.fallback_reason for p in self.parts])

    def _by_part(self, values: list[str | None]) -> str | None:
        """One value where every part says the same, else each part's, named by its device and layers."""
        if len(set(values)) == 1:
            return values[0]
        return "; ".join(f"{self._label(part)}: {value}" for part, value in zip(self.parts, values, strict=True)
                         if value is not None) or None

    @staticmethod
    def _label(part: IpexEngine) -> str:
        return f"layers {part.stage.start}-{part.stage.end - 1} on {part.compute.name}"

    def forward_batch(self, tokens: torch.Tensor, steps: Sequence[SequenceStep]) -> torch.Tensor:
        x = tokens
        for part in self.parts:
            x = part.forward_batch(x, steps)
        return x

    def warmup(self) -> None:
        run_warmup_request(self)

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        from ringlet.worker.batching import generate_alone

        return generate_alone(self, self.config, task)

    def close(self) -> None:
        for part in self.parts:
            part.close()
