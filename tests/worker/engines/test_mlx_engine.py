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


def _batched(engine, tasks, cancel: dict[str, int] | None = None) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """Every task through the engine's batch generator at once; chunks per task id (cancel: task -> after how many
    steps)."""
    generator = engine.batch_generator(8)
    for task in tasks:
        generator.submit(task)
    chunks: dict[str, list] = {task.task_id: [] for task in tasks}
    steps = 0
    while generator:
        for chunk in generator.step():
            chunks[chunk.task_id].append(chunk)
        steps += 1
        for task_id, after in (cancel or {}).items():
            if steps == after:
                assert generator.cancel(task_id)
    return chunks


@pytest.mark.slow
def test_the_batch_gives_each_request_its_own_tokens_stops_and_usage() -> None:
    from ringlet.shared.tasks import SamplingParams, TextGenerationTask

    engine = initialize_engine(local_instance(None, "mlx"), EngineConfig(precision="fp32"))
    greedy = SamplingParams(temperature=0)
    tasks = [TextGenerationTask(task_id="short", prompt="Name three colours.", max_tokens=6, sampling=greedy),
             TextGenerationTask(task_id="long", prompt="Write a sentence about the sea and the wind " * 6,
                                max_tokens=20, sampling=greedy, ignore_eos=True),
             TextGenerationTask(task_id="seeded", prompt="Tell me a story.", max_tokens=12, ignore_eos=True,
                                sampling=SamplingParams(temperature=0.9, seed=11)),
             TextGenerationTask(task_id="two", prompt="Say hi.", max_tokens=5, n=2, ignore_eos=True,
                                sampling=SamplingParams(temperature=0.9, seed=3)),
             TextGenerationTask(task_id="cancelled", prompt="Count to one hundred.", max_tokens=40, sampling=greedy,
                                ignore_eos=True)]
    together = _batched(engine, tasks, cancel={"cancelled": 3})

    def tokens(chunks: list, choice: int = 0) -> list[int]:  # type: ignore[type-arg]
        return [c.token_id for c in chunks if c.token_id is not None and c.choice == choice]

    alone = {t.task_id: _batched(engine, [t])[t.task_id] for t in tasks[:3]}
    for task_id in ("short", "long", "seeded"):  # greedy and seeded tokens do not depend on the rest of the batch
        assert tokens(together[task_id]) == tokens(alone[task_id]), task_id
    last = {task_id: [c for c in chunks if c.finish_reason] for task_id, chunks in together.items()}
    assert last["long"][0].usage.completion_tokens == 20 and last["long"][0].finish_reason == "length"
    assert sorted(c.choice for c in last["two"]) == [0, 1] and [c.last for c in last["two"]].count(True) == 1
    assert tokens(together["two"], 0) != tokens(together["two"], 1)  # choice i samples with seed + i
    assert last["cancelled"] == [] and len(tokens(together["cancelled"])) <= 3
