"""The CUDA engine gives the CPU engine's greedy tokens (fp32 on both, TF32 off: same arithmetic)."""

from __future__ import annotations

import pytest
import torch

from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.engine_init import initialize_engine, local_instance
from tests.support.greedy import (
    COMPARED_TOKENS,
    assert_parting_is_a_near_tie,
    compare_with_reference,
    greedy_task,
    run_greedy,
)

# bf16 carries 8 significant bits: at these logits' magnitude (4..32) one step is 0.03 to 0.125
BF16_LOGIT_TOLERANCE = 0.25


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_greedy_tokens_match_the_cpu_engine(cpu_reference) -> None:  # type: ignore[no-untyped-def]
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default: fp32 matmuls stay fp32
    engine = initialize_engine(local_instance(None, "cuda"), EngineConfig(precision="fp32"))
    run = run_greedy(engine, greedy_task())
    assert len(run.generated) == COMPARED_TOKENS
    assert run.generated == cpu_reference.generated, (run.text, cpu_reference.text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_in_bf16_parts_from_the_cpu_engine_only_at_near_ties(cpu_reference_with_logits) -> None:  # type: ignore[no-untyped-def]
    engine = initialize_engine(local_instance(None, "cuda"), EngineConfig(precision="bf16"))
    detail = compare_with_reference(engine, *cpu_reference_with_logits)
    print(detail)
    assert_parting_is_a_near_tie(detail, BF16_LOGIT_TOLERANCE)
