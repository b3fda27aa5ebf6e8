"""The fp32 CPU engine on the embedded model, and its greedy stream: the reference other engines are compared with
(the CPU-side engines' tests and the GPU ones)."""

from __future__ import annotations

import pytest
import torch

from ringlet.shared.config import EngineConfig
from tests.support.greedy import GreedyRun, greedy_task, greedy_with_logits


@pytest.fixture(scope="session")
def cpu_reference_with_logits(cpu_fp32_engine) -> tuple[GreedyRun, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    """The reference stream and the fp32 logits each of its tokens was picked from."""
    return greedy_with_logits(cpu_fp32_engine, greedy_task())


@pytest.fixture(scope="session")
def cpu_fp32_engine():  # type: ignore[no-untyped-def]
    """The reference: the CPU engine in fp32 on the embedded model."""
    from ringlet.worker.engines.torch.engine import TorchEngine

    return TorchEngine.load(None, device="cpu", config=EngineConfig(precision="fp32"))


@pytest.fixture(scope="session")
def cpu_reference(cpu_reference_with_logits) -> GreedyRun:  # type: ignore[no-untyped-def]
    return cpu_reference_with_logits[0]
