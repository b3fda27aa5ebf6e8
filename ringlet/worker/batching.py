"""Continuous batching: many tasks generate at once, one batched forward a step (`BatchGenerator`).

Tasks arrive at any time and join the next step (`submit`); the scheduler decides who computes what
(`scheduler.py`), the engine computes every planned token in one forward over the paged KV cache, and each
sequence samples with its own parameters and seed, detokenises, and watches its own stop strings and limits. A
step returns what each task streams; a task that ends leaves the batch at once, freeing its blocks for the others.

A step is launched, then collected. Across the stages of a ring (`worker/pipeline.py`) several steps are in flight at
once, each over other sequences (micro-batches), and the last stage samples: the step comes back as token ids. On a
GPU, whose kernels run while the host goes on, the next step is launched as soon as this one's tokens are sampled,
before they become text (`overlap`): the GPU computes while the host detokenises, watches stop strings and streams,
so a step costs the GPU's time rather than the GPU's plus the host's. Where the engine picks greedy tokens on the
device (the graphed CUDA step) and every sequence of a step decodes greedily, the next step is launched before
this one's tokens are even read (`FED`): the GPU then never waits for the host. A sequence that turns out to end at
such a token (an end-of-sequence token read late, a stop string) has one token computed in vain, and dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard, cast

import torch

from ringlet.models.paged_cache import FED, CacheLost, SequenceStep
from ringlet.models.sampling import RequestSampler, argmax
from ringlet.models.stop import StopMatcher
from ringlet.models.tokenizer import StreamingDetokenizer, Tokenizer
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ContextWindowError
from ringlet.shared.messages import BatchStats
from ringlet.shared.tasks import (
    FinishReason,
    GenerationChunk,
    SamplingParams,
    TextGenerationTask,
    Timings,
    TokenLogprob,
    Usage,
)
from ringlet.worker.blocks import BlockManager
from ringlet.worker.engines.torch.generate import choice_sampling, prompt_ids, request_context
from ringlet.worker.scheduler import Planned, Scheduler, Sequence

ASYNC_DEVICES = ("cuda", "xpu")  # a forward returns once its kernels are queued


class BatchModel(Protocol):
    """A model that computes many sequences' tokens in one forward over its paged KV cache."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    vocab_size: int
    context_length: int
    device: torch.device  # where its logits are, and its samplers run
    num_blocks: int
    block_size: int
    pad_slot: int  # a cache slot of zeros, for padding

    def forward_batch(self, tokens: torch.Tensor, steps: list[SequenceStep]) -> torch.Tensor:
        """Token ids [T] of the step (on the CPU, packed in the steps' order) -> logits [R, V] of the steps that want
        them. CacheLost: the step did not run and the cache is empty now (its device failed over)."""
        ...


class PipelinedModel(Protocol):
    """A model whose steps run down a ring of stages, up to `depth` of them in flight, and whose last stage samples
    each sequence as its `begin` said."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    vocab_size: int
    context_length: int
    device: torch.device
    num_blocks: int
    block_size: int
    pad_slot: int
    depth: int

    def begin(self, key: int, sampling: SamplingParams, prompt: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The sequence's sampler here: it passes on the token the last stage drew (with its `last_logprobs`)."""
        ...

    def end(self, keys: list[int]) -> None:
        """These sequences are done: their samplers go (after every step launched so far)."""
        ...

    def launch(self, tokens: torch.Tensor, steps: list[SequenceStep], keys: list[int]) -> None:
        """Start a step: token ids [T] of `steps`, whose sequences are `keys`."""
        ...

    def collect(self) -> torch.Tensor:
        """The token ids [R] sampled for the oldest step in flight."""
        ...


class PicksOnDevice(Protocol):
    """An engine whose steps pick each row's greedy token on the device, and take `FED` token ids."""

    last_picks: Any  # the last step's picks (`tokens()` waits for that step alone), or None where it picked none

    def graphs(self, steps: list[SequenceStep]) -> bool:
        """A step over `steps` picks on the device (and may take FED token ids)."""
        ...


class BatchesItself(Protocol):
    """An engine with a batching loop of its own (MLX: mlx-lm's), with `BatchGenerator`'s interface."""

    context_length: int

    def batch_generator(self, max_running: int) -> Any: ...


@dataclass(eq=False)
class TaskState:
    task: TextGenerationTask
    unfinished: int  # choices still generating


@dataclass(eq=False)
class Choice:
    """One choice of a task: its sequence's sampler, detokeniser and stop strings."""

    of: TaskState
    choice: int
    key: int  # the sequence's number for a pipeline's last stage
    max_tokens: int
    sampler: Callable[[torch.Tensor], torch.Tensor]  # logits [1, V] -> token id (a pipeline's: the id as it came)
    detokenizer: StreamingDetokenizer
    stops: StopMatcher
    arrived_at: float
    first_token_at: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not out yet


class BatchGenerator:
    def __init__(self, model: BatchModel | PipelinedModel, max_step_tokens: int = 512, max_running: int = 64,
                 overlap: bool | None = None, burst_pause: float = 0.25) -> None:
        """`overlap`: launch the next step before this one's tokens become text (default: on a GPU, whose steps
        run asynchronously; on a CPU the forward is the launch, so the text would only come a step later);
        `burst_pause`: see `Scheduler`."""
        self.model = model
        self.pipeline = model if _is_pipelined(model) else None
        self.depth = self.pipeline.depth if self.pipeline is not None else 1
        if overlap is None:
            overlap = model.device.type in ASYNC_DEVICES
        self.overlap = overlap and self.pipeline is None
        self.blocks = BlockManager(model.num_blocks, model.block_size)
        self.scheduler: Scheduler[Choice] = Scheduler(self.blocks, max_step_tokens, max_running, burst_pause)
        self.eos = set(model.tokenizer.eos_token_ids)
        self.last_step_tokens = 0
        # the other choices of a task wait until its first has its prompt in the cache, then share those blocks
        self._followers: dict[str, list[Sequence[Choice]]] = {}
        # steps launched and not collected: their plans, and their logits where computed already
        self._in_flight: deque[tuple[list[Planned[Choice]], torch.Tensor | None]] = deque()
        self._keys = 0


    @classmethod
    def configured(cls, model: BatchModel | PipelinedModel, config: EngineConfig) -> BatchGenerator:
        return cls(model, config.max_step_tokens, config.max_batch, burst_pause=config.burst_pause_ms / 1000)
    def __bool__(self) -> bool:
        """Sequences to run, or a step in flight to collect (possibly over sequences that ended meanwhile)."""
        return bool(self.scheduler) or bool(self._in_flight)

    def running_ids(self) -> set[str]:
        """The tasks with a place in the batch."""
        return {s.state.of.task.task_id for s in self.scheduler.running}

    def stats(self) -> BatchStats:
        blocks = self.blocks
        return BatchStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                          step_tokens=self.last_step_tokens, kv_blocks_used=blocks.num_blocks - blocks.free_blocks,
                          kv_blocks=blocks.num_blocks, preemptions=self.scheduler.preemptions)

    def task_ids(self) -> list[str]:
        """Every task here, running or waiting."""
        sequences = [*self.scheduler.running, *self.scheduler.waiting, *(s for f in self._followers.values() for s in f)]
        return list(dict.fromkeys(s.state.of.task.task_id for s in sequences))

    def submit(self, task: TextGenerationTask) -> None:
        """Queue a task; a prompt that cannot run at all raises ValueError (ContextWindowError) here."""
        ids = prompt_ids(self.model.tokenizer, task)
        if not ids:
            raise ValueError("the prompt has no tokens (empty, or only characters the tokenizer drops); send some text")
        context = request_context(task, min(self.model.context_length, self.blocks.num_blocks * self.blocks.block_size))
        if len(ids) >= context:
            raise ContextWindowError(f"the prompt has {len(ids)} tokens but the context window is {context}; "
                                     "shorten the prompt")
        room = context - len(ids)
        group, arrived_at = TaskState(task, task.n), time.perf_counter()
        sequences = []
        for choice in range(task.n):
            self._keys += 1
            sequences.append(Sequence(_seq_id(task, choice), list(ids), len(ids), Choice(
                group, choice, self._keys, min(task.max_tokens or room, room),
                self._sampler(self._keys, choice_sampling(task.sampling, choice), ids),
                StreamingDetokenizer(self.model.tokenizer), StopMatcher(task.stop), arrived_at)))
        self.scheduler.add(sequences[0])
        if len(sequences) > 1:
            self._followers[sequences[0].seq_id] = sequences[1:]

    def cancel(self, task_id: str) -> bool:
        """Drop a task (all its choices) between two steps; False if it is not here (finished already)."""
        dropped: list[Sequence[Choice]] = []
        for sequence in [*self.scheduler.running, *self.scheduler.waiting]:
            if sequence.state.of.task.task_id == task_id and self.scheduler.remove(sequence.seq_id) is not None:
                dropped.append(sequence)
        for leader in [k for k, v in self._followers.items() if v[0].state.of.task.task_id == task_id]:
            dropped.extend(self._followers.pop(leader))
        self._end(dropped)
        return bool(dropped)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def step(self) -> list[GenerationChunk]:
        """Compute one step; the chunks of every task that produced text or ended in it."""
        self.launch()
        return self.collect() if self._in_flight else []

    def launch(self) -> int:
        """Start steps over the sequences no step in flight computes, until `depth` steps are in flight or nothing
        more can run; how many it started."""
        started = 0
        while len(self._in_flight) < self.depth and self._launch_one():
            started += 1
        return started

    def _launch_one(self, ending: frozenset[str] = frozenset()) -> bool:
        """Plan a step over the sequences no step in flight computes (nor `ending`: those that end at the token
        just sampled), and start it; False if none can run."""
        busy = frozenset(p.sequence.seq_id for plan, _ in self._in_flight for p in plan) | ending
        share = None  # a pipeline's micro-batches split the sequences between its steps in flight
        if self.depth > 1:
            share = max(1, -(-(len(self.scheduler.running) + len(self.scheduler.waiting)) // self.depth))
        planned = self.scheduler.plan(busy, share)
        if not planned:
            return False
        self._start(planned)
        return True

    def _steps(self, planned: list[Planned[Choice]]) -> list[SequenceStep]:
        return [SequenceStep(p.start, p.count, self.blocks.table(p.sequence.seq_id)[:self.blocks.blocks_for(
            p.start + p.count)], p.samples) for p in planned]

    def _start(self, planned: list[Planned[Choice]], steps: list[SequenceStep] | None = None) -> None:
        """Launch the step of `planned` (its `steps`, where built already)."""
        steps = steps or self._steps(planned)
        tokens = torch.tensor([t for p in planned for t in p.sequence.tokens[p.start:p.start + p.count]],
                              dtype=torch.long)
        if self.pipeline is not None:
            self.pipeline.launch(tokens, steps, [p.sequence.state.key for p in planned])
            self._in_flight.append((planned, None))
        else:
            try:
                logits = cast("BatchModel", self.model).forward_batch(tokens, steps)
            except CacheLost:  # the engine goes on with an empty cache: every sequence computes its tokens again
                self.scheduler.requeue_all()
                self.blocks.forget_contents()
                self._launch_one()
                return
            self._in_flight.append((planned, logits))

    def collect(self) -> list[GenerationChunk]:
        """Finish the oldest step in flight; the chunks of every task that produced text or ended in it."""
        planned, logits = self._in_flight.popleft()
        self.last_step_tokens = sum(p.count for p in planned)
        if logits is None:
            assert self.pipeline is not None, "only a pipeline's steps are computed elsewhere"
            logits = self.pipeline.collect()
        picks = getattr(self.model, "last_picks", None) if self.overlap else None  # this step's: none launched since
        self.scheduler.computed(planned)
        for entry in planned:
            if entry.sequence.prefilled and entry.sequence.seq_id in self._followers:
                for follower in self._followers.pop(entry.sequence.seq_id):
                    self.scheduler.add(follower)
        sampled = _sampling(planned)
        assert len(sampled) == logits.shape[0], "a step returns one row for each sequence it samples"
        # not cancelled while its step was in flight
        live = [(row, entry.sequence) for row, entry in enumerate(sampled) if entry.sequence.seq_id in self.blocks]
        if picks is not None and self._feedable(planned, [s for _, s in live]):
            token_ids = self._launch_fed([s for _, s in live], picks)
        else:
            token_ids = sample_rows(logits, [row for row, _ in live], [s.state.sampler for _, s in live])
            for (_, sequence), token_id in zip(live, token_ids, strict=True):
                sequence.tokens.append(token_id)
            if self.overlap:
                # the next step runs on the device while these tokens become text; it leaves out the sequences that
                # certainly end here (an end-of-sequence token, the token limit)
                self._launch_one(frozenset(s.seq_id for (_, s), t in zip(live, token_ids, strict=True)
                                           if self._ends_at(s, t)))
        out: list[GenerationChunk] = []
        for (_, sequence), token_id in zip(live, token_ids, strict=True):
            out.extend(self._advance(sequence, token_id))
        return out

    def _feedable(self, planned: list[Planned[Choice]], sequences: list[Sequence[Choice]]) -> bool:
        """The step's rows are every sequence there is, all greedy, none at its token limit: the next step decodes
        them all, row for row, each from the token this step picked on the device."""
        return (len(sequences) == len(planned) == len(self.scheduler.running) and not self.scheduler.waiting
                and not self._followers
                and all(getattr(s.state.sampler, "plain_greedy", False) and s.generated + 1 < s.state.max_tokens
                        for s in sequences))

    def _launch_fed(self, sequences: list[Sequence[Choice]], picks: Any) -> list[int]:
        """Launch the next step over `sequences` with the tokens this step picked on the device, then read those
        tokens (the next step computing meanwhile); a plan that is not row for row the same (a preemption) waits
        for the tokens and launches with them."""
        for sequence in sequences:
            sequence.tokens.append(FED)
        planned = self.scheduler.plan()
        steps = self._steps(planned)
        fed = [p.sequence for p in planned] == sequences and cast("PicksOnDevice", self.model).graphs(steps)
        if fed:
            self._start(planned, steps)
        token_ids: list[int] = picks.tokens()
        for sequence, token_id in zip(sequences, token_ids, strict=True):
            sequence.tokens[-1] = token_id
        if planned and not fed:
            self._start(planned, steps)
        return token_ids

    def _ends_at(self, sequence: Sequence[Choice], token_id: int) -> bool:
        """The sequence ends with its newest token, `token_id`, whatever its text (stop strings aside)."""
        choice = sequence.state
        return (token_id in self.eos and not choice.of.task.ignore_eos) or sequence.generated >= choice.max_tokens

    def _sampler(self, key: int, sampling: SamplingParams, prompt: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.pipeline is not None:
            return self.pipeline.begin(key, sampling, prompt)
        return RequestSampler(sampling, prompt, self.model.vocab_size, self.model.device, self.model.tokenizer)

    def _end(self, sequences: list[Sequence[Choice]]) -> None:
        if self.pipeline is not None and sequences:
            self.pipeline.end([s.state.key for s in sequences])

    def _advance(self, sequence: Sequence[Choice], token_id: int) -> Iterator[GenerationChunk]:
        """The text of the sequence's newest token, `token_id`, and its end if it ends there."""
        chunk, finish = feed_token(sequence.state, token_id, sequence.generated, self.eos)
        if chunk is not None:
            yield chunk
        if finish is not None:
            self.scheduler.remove(sequence.seq_id)
            self._end([sequence])
            yield last_chunk(sequence.state, sequence.prompt_length, sequence.generated, finish)


def sample_rows(logits: torch.Tensor, rows: list[int],
                samplers: list[Callable[[torch.Tensor], torch.Tensor]]) -> list[int]:
    """The next token of each of `rows` of `logits` by its sampler: the plain greedy rows in one argmax and one
    transfer, the others one by one."""
    tokens = [0] * len(rows)
    greedy = [i for i, sampler in enumerate(samplers) if getattr(sampler, "plain_greedy", False)]
    if greedy:
        picked = [rows[i] for i in greedy]
        greedy_logits = logits if picked == list(range(logits.shape[0])) else logits[
            torch.tensor(picked, device=logits.device)]
        for i, token_id in zip(greedy, argmax(greedy_logits).tolist(), strict=True):
            tokens[i] = token_id
    chosen = set(greedy)
    for i, (row, sampler) in enumerate(zip(rows, samplers, strict=True)):
        if i not in chosen:
            tokens[i] = int(sampler(logits[row:row + 1]).item())
    return tokens


def generate_alone(model: BatchModel | PipelinedModel, config: EngineConfig,
                   task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
    """One task alone (`ringlet run`, `ringlet bench`): the batched loop with a batch of one."""
    generator = BatchGenerator.configured(model, config)
    generator.submit(task)
    while generator:
        yield from generator.step()


def feed_token(choice: Choice, token_id: int, generated: int, eos: set[int],
               logprob: TokenLogprob | None = None) -> tuple[GenerationChunk | None, FinishReason | None]:
    """A choice's `generated`-th token: the text it completes (held back while it may begin a stop string), and
    why the choice ends here, if it does. Its log-probability (`logprob`, else its sampler's) goes out with the
    first chunk that has text."""
    task = choice.of.task
    if generated == 1:
        choice.first_token_at = time.perf_counter()
    if token_id in eos and not task.ignore_eos:
        return None, "error" if getattr(choice.sampler, "failure", None) else "stop"
    logprob = logprob or getattr(choice.sampler, "last_logprobs", None)
    if logprob is not None and task.sampling.logprobs is not None:
        choice.logprobs.append(logprob)
    text = choice.stops.feed(choice.detokenizer.add_token(token_id))
    chunk = None
    if text:
        chunk = GenerationChunk(task_id=task.task_id, choice=choice.choice, text=text, token_id=token_id,
                                logprobs=_take_logprobs(choice))
    if choice.stops.stopped:
        return chunk, "stop"
    return chunk, "length" if generated >= choice.max_tokens else None


def last_chunk(choice: Choice, prompt_length: int, generated: int, finish: FinishReason) -> GenerationChunk:
    """The chunk that ends a choice: the text held back, usage and timings (`last` once every choice ended)."""
    choice.of.unfinished -= 1
    tail = "" if choice.stops.stopped else choice.stops.feed(choice.detokenizer.finalize()) + choice.stops.flush()
    done = time.perf_counter()
    prefill_s = max(choice.first_token_at - choice.arrived_at, 1e-9)
    decode_s = done - choice.first_token_at
    return GenerationChunk(
        task_id=choice.of.task.task_id, choice=choice.choice, text=tail, finish_reason=finish,
        stop_sequence=choice.stops.matched, last=choice.of.unfinished == 0, logprobs=_take_logprobs(choice),
        usage=Usage(prompt_tokens=prompt_length, completion_tokens=generated),
        timings=Timings(time_to_first_token_s=prefill_s, prefill_tokens_per_s=prompt_length / prefill_s,
                        decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0),
    )


def _take_logprobs(choice: Choice) -> list[TokenLogprob] | None:
    taken, choice.logprobs = choice.logprobs or None, []
    return taken


def _is_pipelined(model: BatchModel | PipelinedModel) -> TypeGuard[PipelinedModel]:
    return hasattr(model, "launch")


def _seq_id(task: TextGenerationTask, choice: int) -> str:
    return task.task_id if task.n == 1 else f"{task.task_id}#{choice}"


def _sampling(planned: list[Planned[Choice]]) -> list[Planned[Choice]]:
    """The entries whose logits the step returns, in the layout's order."""
    return [p for p in planned if p.samples]
