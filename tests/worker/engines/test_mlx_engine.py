"""The MLX engine (mlx-lm's llama model, here on the Linux CPU) against the torch CPU engine."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx_lm", reason="the mlx engine needs mlx, mlx-cpu and mlx-lm (pip install them)")

from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.engine_init import initialize_engine, local_instance
from tests.support.greedy import COMPARED_TOKENS, greedy_task, run_greedy


@pytest.mark.slow
def test_greedy_tokens_of_the_embedded_model_match_the_torch_engine(cpu_reference) -> None:  # type: ignore[no-untyped-def]
    engine = initialize_engine(local_instance(None, "mlx"), EngineConfig(precision="fp32"))
    assert engine.name == "mlx"
    run = run_greedy(engine, greedy_task())
    assert len(run.generated) == COMPARED_TOKENS
    assert run.generated == cpu_reference.generated
    assert run.text == cpu_reference.text

    # a second request with the same prompt reuses the cached prefix: MLX's cache is trimmed back to it
    with_prefix = list(engine.generate(greedy_task(tokens=4)))
    assert with_prefix[-1].usage is not None and with_prefix[-1].usage.completion_tokens == 5
    assert engine.generator.cached[len(run.prompt):] == cpu_reference.generated[:4]
