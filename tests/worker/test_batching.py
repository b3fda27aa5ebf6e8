"""Continuous batching on a tiny random model (fp32, CPU): a request gives the same tokens alone, in a batch, joining
one that is running, after a preemption, and from a cached prefix; a cancel leaves the others untouched. The batch
tests run three ways: each step collected before the next is launched; the next step launched before this one's
tokens become text (`overlap`, a GPU's way; on a CPU it only reorders the work); and, on an engine that picks greedy
tokens as the graphed CUDA step does, the next step launched with this one's picks before the host reads them."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from ringlet.models.paged_cache import FED, SequenceStep
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


class PickingEngine:
    """The tiny engine with the graphed CUDA step's contract: a step of single-token rows that all want logits picks
    each row's greedy token, and the next such step may take a row's token as FED (the pick of the same row)."""

    def __init__(self, engine: TorchBatchEngine) -> None:
        self.engine = engine
        self.last_picks: Any = None
        self.fed_steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def graphs(self, steps: list[SequenceStep]) -> bool:
        return all(s.count == 1 and s.wants_logits for s in steps)

    def forward_batch(self, tokens: torch.Tensor, steps: list[SequenceStep]) -> torch.Tensor:
        if bool((tokens == FED).any()):
            assert self.graphs(steps) and self.last_picks is not None, "FED only after and into a picking step"
            assert len(steps) <= len(self.last_picks.tokens()), "a FED row is a row of the previous step"
            picked = torch.tensor(self.last_picks.tokens()[:len(steps)])
            tokens, self.fed_steps = torch.where(tokens == FED, picked, tokens), self.fed_steps + 1
        logits = self.engine.forward_batch(tokens, steps)
        ids = logits.argmax(-1).tolist()
        self.last_picks = SimpleNamespace(tokens=lambda: ids) if self.graphs(steps) else None
        return logits


def generator_for(engine: TorchBatchEngine, mode: str = "in-turn") -> BatchGenerator:
    model = PickingEngine(engine) if mode == "fed" else engine
    return BatchGenerator(model, max_step_tokens=64, max_running=8, overlap=mode != "in-turn")  # type: ignore[arg-type]


def drain(generator: BatchGenerator, tasks: list[TextGenerationTask]) -> dict[str, list[int]]:
    """Submit every task at once and step until all ended; the token ids each streamed."""
    for t in tasks:
        generator.submit(t)
    tokens: dict[str, list[int]] = {t.task_id: [] for t in tasks}
    while generator:
        for chunk in generator.step():
            if chunk.token_id is not None:
                tokens[chunk.task_id].append(chunk.token_id)
    return tokens


def run(engine: TorchBatchEngine, tasks: Iterable[TextGenerationTask], join_every: int = 0,
        cancel: dict[str, int] | None = None, overlap: str = "in-turn") -> dict[str, list[int]]:
    """The token ids each task streams; with `join_every` a task joins every that many steps, and `cancel` cancels a
    task after that many steps."""
    generator = generator_for(engine, overlap)
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


@pytest.fixture(params=["in-turn", "overlapped", "fed"])
def overlap(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def engine() -> TorchBatchEngine:
    return tiny_batch_engine()


@pytest.fixture(scope="module")
def alone(engine: TorchBatchEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for n, prompt in enumerate(PROMPTS):
        out |= run(engine, [task(n, prompt)])
    return out


def test_a_batch_gives_each_request_its_tokens_alone(engine: TorchBatchEngine, alone: dict[str, list[int]],
                                                     overlap: str) -> None:
    assert all(len(ids) == 12 for ids in alone.values())
    assert run(engine, [task(n, p) for n, p in enumerate(PROMPTS)], overlap=overlap) == alone


def test_requests_joining_and_leaving_mid_generation_keep_their_tokens(engine: TorchBatchEngine,
                                                                       alone: dict[str, list[int]],
                                                                       overlap: str) -> None:
    lengths = [3, 12, 7, 12, 5]  # leave at different steps
    tasks = [task(n, p, tokens=k) for n, (p, k) in enumerate(zip(PROMPTS, lengths, strict=True))]
    joined = run(engine, tasks, join_every=2, overlap=overlap)
    assert joined == {f"task-{n}": alone[f"task-{n}"][:k] for n, k in enumerate(lengths)}


def test_a_seeded_sampled_request_gives_the_same_tokens_in_any_batch(engine: TorchBatchEngine, overlap: str) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, repetition_penalty=1.3, frequency_penalty=0.3)
    alone = run(engine, [task(0, PROMPTS[1], sampling=seeded)])["task-0"]
    others = [task(n, p, sampling=SamplingParams(temperature=1.0, seed=n)) for n, p in enumerate(PROMPTS) if n]
    together = run(engine, [task(0, PROMPTS[1], sampling=seeded), *others], join_every=1, overlap=overlap)["task-0"]
    assert together == alone and len(set(alone)) > 3


@pytest.mark.parametrize("mode", ["overlapped", "fed"])
def test_a_stop_string_met_while_the_next_step_computes_leaves_the_others_unchanged(
        engine: TorchBatchEngine, alone: dict[str, list[int]], mode: str) -> None:
    """The step after a stop string's token is already running when the text shows the stop: the stopped
    sequence's extra token is dropped, the others go on as alone."""
    text = engine.tokenizer.decode(alone["task-1"][:6], skip_special_tokens=False)
    stop = text[-3:]  # met at the 6th token at the latest
    stopping = task(1, PROMPTS[1]).model_copy(update={"stop": [stop]})
    generator = generator_for(engine, mode)
    for t in [task(0, PROMPTS[0]), stopping, task(2, PROMPTS[2])]:
        generator.submit(t)
    tokens: dict[str, list[int]] = {"task-0": [], "task-1": [], "task-2": []}
    text_of_1, overlapped = "", 0
    while generator:
        for chunk in generator.step():
            if chunk.token_id is not None:
                tokens[chunk.task_id].append(chunk.token_id)
            if chunk.task_id == "task-1":
                text_of_1 += chunk.text
                if chunk.finish_reason is not None:
                    assert chunk.finish_reason == "stop"
        overlapped += generator.in_flight
    assert stop not in text_of_1 and text.startswith(text_of_1)
    assert tokens["task-1"] == alone["task-1"][:len(tokens["task-1"])] and len(tokens["task-1"]) <= 6
    assert (tokens["task-0"], tokens["task-2"]) == (alone["task-0"], alone["task-2"])
    assert overlapped > 10, "a step is in flight after each collect while sequences run"


def test_greedy_steps_take_the_device_picks_and_an_end_token_read_late_loses_nothing(
        engine: TorchBatchEngine, alone: dict[str, list[int]]) -> None:
    """Fed: the decode steps of greedy sequences are launched with the previous step's picks; a sequence whose
    picked token turns out to end it (here an end-of-sequence id) has its next step's row dropped."""
    tasks = [task(n, p).model_copy(update={"ignore_eos": n != 3}) for n, p in enumerate(PROMPTS)]
    end = alone["task-3"][4]  # task-3 ends at its 5th token (or earlier, where that id came before)
    results = {}
    for mode in ("in-turn", "fed"):
        generator = generator_for(engine, mode)
        generator.eos = {end}
        results[mode] = drain(generator, tasks)
        if mode == "fed":
            assert cast(PickingEngine, generator.model).fed_steps >= 8
    ended = alone["task-3"][:alone["task-3"].index(end)]
    assert results["fed"] == results["in-turn"] == alone | {"task-3": ended}


def test_a_full_cache_preempts_and_the_request_resumes_with_the_same_tokens(engine: TorchBatchEngine,
                                                                            overlap: str) -> None:
    sampled = SamplingParams(temperature=1.0, seed=3, presence_penalty=0.5)
    tasks = [task(0, PROMPTS[0], 40), task(1, PROMPTS[2], 40, sampled), task(2, PROMPTS[4], 40)]
    alone: dict[str, list[int]] = {}
    for t in tasks:
        alone |= run(engine, [t])
    # 5 blocks of 16 positions: three requests growing to 41-46 positions (3 blocks each) cannot all stay
    small = tiny_batch_engine(EngineConfig(kv_cache_tokens=80))
    generator = generator_for(small, overlap)
    tokens = drain(generator, tasks)
    assert generator.scheduler.preemptions > 0
    assert tokens == alone


def test_a_cancel_leaves_the_others_unchanged(engine: TorchBatchEngine, alone: dict[str, list[int]],
                                              overlap: str) -> None:
    tokens = run(engine, [task(n, p) for n, p in enumerate(PROMPTS)], cancel={"task-1": 4}, overlap=overlap)
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
    # the chunks before the last token differ in size (39 rows, 7 rows), and a CPU's matrix kernels may block
    # them differently: equal up to float32 rounding
    torch.testing.assert_close(cold, warm, rtol=1e-5, atol=1e-5)
    assert torch.equal(cold.argmax(-1), warm.argmax(-1))


def test_a_prompt_that_cannot_run_is_refused_when_submitted(engine: TorchBatchEngine) -> None:
    generator = BatchGenerator(engine)
    with pytest.raises(ContextWindowError, match="context window is 1024"):
        generator.submit(task(0, words(*([3] * 1100))))
    with pytest.raises(ValueError, match="no tokens"):
        generator.submit(TextGenerationTask(task_id="empty", prompt="", sampling=GREEDY))
    assert not generator


def test_a_requests_own_context_window_bounds_its_answer(engine: TorchBatchEngine,
                                                         alone: dict[str, list[int]]) -> None:
    prompt = PROMPTS[1]
    prompt_length = len(engine.tokenizer.encode(prompt))
    windowed = task(1, prompt).model_copy(update={"context_window": prompt_length + 5})
    assert run(engine, [windowed])["task-1"] == alone["task-1"][:5], "five positions are left for the answer"
    generator = BatchGenerator(engine)
    with pytest.raises(ContextWindowError, match="context window is 8"):
        generator.submit(task(2, words(*range(20))).model_copy(update={"context_window": 8}))
    with pytest.raises(ContextWindowError, match="num_ctx.*max_context 4096"):
        generator.submit(task(3, prompt).model_copy(update={"context_window": 4096}))
    assert not generator


def test_slots_never_written_are_never_read(alone: dict[str, list[int]]) -> None:
    """A cache full of NaN (what unwritten memory may hold) gives the same tokens: padding reads the zero slot."""
    poisoned = tiny_batch_engine()
    for tensor in (*poisoned.cache.keys, *poisoned.cache.values):
        tensor[:poisoned.pad_slot].fill_(float("nan"))
    assert run(poisoned, [task(n, p) for n, p in enumerate(PROMPTS)]) == alone


def test_n_choices_share_the_prompt_and_sample_as_seeded_requests_would(engine: TorchBatchEngine,
                                                                         overlap: str) -> None:
    prompt = words(*range(30, 70))  # 40 tokens: the later choices find its two whole blocks cached
    seeded = SamplingParams(temperature=1.0, seed=11)
    separately = [run(engine, [task(i, prompt, sampling=seeded.model_copy(update={"seed": 11 + i}))])[f"task-{i}"]
                  for i in range(3)]
    generator = generator_for(engine, overlap)
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
