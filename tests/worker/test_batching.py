"""Continuous batching on a tiny random model (fp32, CPU): a request gives the same tokens alone, in a batch, joining
one that is running, after a preemption, and from a cached prefix; a cancel leaves the others untouched."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from ringlet.models.paged_cache import SequenceStep
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ContextWindowError
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.batching import BatchGenerator
from ringlet.worker.blocks import BlockManager
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from tests.support.tiny_model import tiny_batch_engine, words

GREEDY = SamplingParams(temperature=0)
PROMPTS = [words(1, 2, 3), words(*range(10, 50)), words(7), words(*range(100, 119)), words(5, 5, 5, 5, 5, 5)]


def task(n: int, prompt: str, tokens: int = 12, sampling: SamplingParams = GREEDY) -> TextGenerationTask:
    return TextGenerationTask(task_id=f"task-{n}", prompt=prompt, max_tokens=tokens, sampling=sampling,
                              ignore_eos=True)


def run(engine: TorchBatchEngine, tasks: Iterable[TextGenerationTask], join_every: int = 0,
        cancel: dict[str, int] | None = None) -> dict[str, list[int]]:
    """The token ids each task streams; with `join_every` a task joins every that many steps, and `cancel` cancels a
    task after that many steps."""
    generator = BatchGenerator(engine, max_step_tokens=64, max_running=8)
    pending = list(tasks)
    tokens: dict[str, list[int]] = {t.task_id: [] for t in pending}
    step = 0
    while pending or generator:
        while pending and (join_every == 0 or step % join_every == 0):
            generator.submit(pending.pop(0))
            if join_every:
                break
        for task_id, at in (cancel or {}).items():
            if step == at:
                assert generator.cancel(task_id)
        chunks: list[GenerationChunk] = generator.step()
        for chunk in chunks:
            if chunk.token_id is not None:
                tokens[chunk.task_id].append(chunk.token_id)
        step += 1
    return tokens


@pytest.fixture(scope="module")
def engine() -> TorchBatchEngine:
    return tiny_batch_engine()


@pytest.fixture(scope="module")
def alone(engine: TorchBatchEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for n, prompt in enumerate(PROMPTS):
        out |= run(engine, [task(n, prompt)])
    return out


def test_a_batch_gives_each_request_its_tokens_alone(engine: TorchBatchEngine, alone: dict[str, list[int]]) -> None:
    assert all(len(ids) == 12 for ids in alone.values())
    assert run(engine, [task(n, p) for n, p in enumerate(PROMPTS)]) == alone


def test_requests_joining_and_leaving_mid_generation_keep_their_tokens(engine: TorchBatchEngine,
                                                                       alone: dict[str, list[int]]) -> None:
    lengths = [3, 12, 7, 12, 5]  # leave at different steps
    tasks = [task(n, p, tokens=k) for n, (p, k) in enumerate(zip(PROMPTS, lengths, strict=True))]
    joined = run(engine, tasks, join_every=2)
    assert joined == {f"task-{n}": alone[f"task-{n}"][:k] for n, k in enumerate(lengths)}


def test_a_seeded_sampled_request_gives_the_same_tokens_in_any_batch(engine: TorchBatchEngine) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, repetition_penalty=1.3, frequency_penalty=0.3)
    alone = run(engine, [task(0, PROMPTS[1], sampling=seeded)])["task-0"]
    others = [task(n, p, sampling=SamplingParams(temperature=1.0, seed=n)) for n, p in enumerate(PROMPTS) if n]
    together = run(engine, [task(0, PROMPTS[1], sampling=seeded), *others], join_every=1)["task-0"]
    assert together == alone and len(set(alone)) > 3


def test_a_full_cache_preempts_and_the_request_resumes_with_the_same_tokens(engine: TorchBatchEngine) -> None:
    sampled = SamplingParams(temperature=1.0, seed=3, presence_penalty=0.5)
    tasks = [task(0, PROMPTS[0], 40), task(1, PROMPTS[2], 40, sampled), task(2, PROMPTS[4], 40)]
    alone: dict[str, list[int]] = {}
    for t in tasks:
        alone |= run(engine, [t])
    # 5 blocks of 16 positions: three requests growing to 41-46 positions (3 blocks each) cannot all stay
    small = tiny_batch_engine(EngineConfig(kv_cache_tokens=80))
    generator = BatchGenerator(small, max_step_tokens=64, max_running=8)
    for t in tasks:
        generator.submit(t)
    tokens: dict[str, list[int]] = {t.task_id: [] for t in tasks}
    while generator:
        for chunk in generator.step():
            if chunk.token_id is not None:
                tokens[chunk.task_id].append(chunk.token_id)
    assert generator.scheduler.preemptions > 0
    assert tokens == alone


def test_a_cancel_leaves_the_others_unchanged(engine: TorchBatchEngine, alone: dict[str, list[int]]) -> None:
    tokens = run(engine, [task(n, p) for n, p in enumerate(PROMPTS)], cancel={"task-1": 4})
    assert len(tokens.pop("task-1")) < 12
    assert tokens == {k: v for k, v in alone.items() if k != "task-1"}


def test_a_cached_prefix_gives_the_logits_of_a_cold_prefill(engine: TorchBatchEngine) -> None:
    prompt = list(range(20, 60))  # 40 tokens: two whole blocks and a part
    blocks = BlockManager(engine.num_blocks, engine.block_size)

    def last_logits(seq_id: str) -> torch.Tensor:
        computed = blocks.admit(seq_id, prompt)
        blocks.reserve(seq_id, len(prompt) - computed)
        steps = [SequenceStep(computed, len(prompt) - 1 - computed, blocks.table(seq_id), wants_logits=False)]
        if steps[0].count:
            engine.forward_batch(torch.tensor(prompt[computed:-1]), steps)
        blocks.advance(seq_id, prompt[:-1])
        logits = engine.forward_batch(torch.tensor(prompt[-1:]), [SequenceStep(len(prompt) - 1, 1, blocks.table(seq_id))])
        blocks.advance(seq_id, prompt)
        return (logits, computed)  # type: ignore[return-value]

    cold, cold_cached = last_logits("cold")
    warm, warm_cached = last_logits("warm")
    assert (cold_cached, warm_cached) == (0, 32)
    assert torch.equal(cold, warm)


def test_a_prompt_that_cannot_run_is_refused_when_submitted(engine: TorchBatchEngine) -> None:
    generator = BatchGenerator(engine)
    with pytest.raises(ContextWindowError, match="context window is 1024"):
        generator.submit(task(0, words(*([3] * 1100))))
    with pytest.raises(ValueError, match="no tokens"):
        generator.submit(TextGenerationTask(task_id="empty", prompt="", sampling=GREEDY))
    assert not generator


def test_slots_never_written_are_never_read(alone: dict[str, list[int]]) -> None:
    """A cache full of NaN (what unwritten memory may hold) gives the same tokens: padding reads the zero slot."""
    poisoned = tiny_batch_engine()
    for tensor in (*poisoned.cache.keys, *poisoned.cache.values):
        tensor[:poisoned.pad_slot].fill_(float("nan"))
    assert run(poisoned, [task(n, p) for n, p in enumerate(PROMPTS)]) == alone


def test_n_choices_share_the_prompt_and_sample_as_seeded_requests_would(engine: TorchBatchEngine) -> None:
    prompt = words(*range(30, 70))  # 40 tokens: the later choices find its two whole blocks cached
    seeded = SamplingParams(temperature=1.0, seed=11)
    separately = [run(engine, [task(i, prompt, sampling=seeded.model_copy(update={"seed": 11 + i}))])[f"task-{i}"]
                  for i in range(3)]
    generator = BatchGenerator(engine, max_step_tokens=64, max_running=8)
    generator.submit(TextGenerationTask(task_id="multi", prompt=prompt, max_tokens=12, sampling=seeded, n=3,
                                        ignore_eos=True))
    computed = 0
    by_choice: dict[int, list[int]] = {0: [], 1: [], 2: []}
    last: list[bool] = []
    while generator:
        chunks = generator.step()
        computed += generator.last_step_tokens
        for chunk in chunks:
            if chunk.token_id is not None:
                by_choice[chunk.choice].append(chunk.token_id)
            last.append(chunk.last)
    assert [by_choice[i] for i in range(3)] == separately
    assert last.count(True) == 1 and last[-1], "one chunk ends the task: the last of its choices"
    # the first choice computes the prompt (40) and its tokens; the others only what follows the shared 32
    assert computed == 40 + 11 + 2 * (8 + 11)
