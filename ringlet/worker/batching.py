"""Continuous batching: many tasks generate at once, one batched forward a step (`BatchGenerator`).

Tasks arrive at any time and join the next step (`submit`); the scheduler decides who computes what
(`scheduler.py`), the engine computes every planned token in one forward over the paged KV cache, and each
sequence samples with its own parameters and seed, detokenises, and watches its own stop strings and limits. A
step returns what each task streams; a task that ends leaves the batch at once, freeing its blocks for the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ringlet.models.paged_cache import BatchLayout, SequenceStep
from ringlet.models.sampling import RequestSampler
from ringlet.models.stop import StopMatcher
from ringlet.models.tokenizer import StreamingDetokenizer, Tokenizer
from ringlet.shared.errors import ContextWindowError
from ringlet.shared.messages import BatchStats
from ringlet.shared.tasks import FinishReason, GenerationChunk, TextGenerationTask, Timings, Usage
from ringlet.worker.blocks import BlockManager
from ringlet.worker.engines.torch.generate import choice_sampling, prompt_ids
from ringlet.worker.scheduler import Planned, Scheduler, Sequence


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

    def forward_batch(self, tokens: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Token ids [T] of the step (packed as the layout says) -> logits [R, V] of its logit rows."""
        ...


@dataclass(eq=False)
class _Task:
    task: TextGenerationTask
    unfinished: int  # choices still generating


@dataclass(eq=False)
class _Request:
    """One choice of a task: its sequence's sampler, detokeniser and stop strings."""

    of: _Task
    choice: int
    max_tokens: int
    sampler: RequestSampler
    detokenizer: StreamingDetokenizer
    stops: StopMatcher
    arrived_at: float
    first_token_at: float = 0.0


class BatchGenerator:
    def __init__(self, model: BatchModel, max_step_tokens: int = 512, max_running: int = 64) -> None:
        self.model = model
        self.blocks = BlockManager(model.num_blocks, model.block_size)
        self.scheduler: Scheduler[_Request] = Scheduler(self.blocks, max_step_tokens, max_running)
        self.eos = set(model.tokenizer.eos_token_ids)
        self.last_step_tokens = 0
        # the other choices of a task wait until its first has its prompt in the cache, then share those blocks
        self._followers: dict[str, list[Sequence[_Request]]] = {}

    def __bool__(self) -> bool:
        return bool(self.scheduler)

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
        context = min(self.model.context_length, self.blocks.num_blocks * self.blocks.block_size)
        if len(ids) >= context:
            raise ContextWindowError(f"the prompt has {len(ids)} tokens but the model's context window is {context}; "
                                     "shorten the prompt")
        room = context - len(ids)
        group, arrived_at = _Task(task, task.n), time.perf_counter()
        sequences = [Sequence(_seq_id(task, choice), list(ids), len(ids), _Request(
            group, choice, min(task.max_tokens or room, room),
            RequestSampler(choice_sampling(task.sampling, choice), ids, self.model.vocab_size, self.model.device),
            StreamingDetokenizer(self.model.tokenizer), StopMatcher(task.stop), arrived_at))
            for choice in range(task.n)]
        self.scheduler.add(sequences[0])
        if len(sequences) > 1:
            self._followers[sequences[0].seq_id] = sequences[1:]

    def cancel(self, task_id: str) -> bool:
        """Drop a task (all its choices) between two steps; False if it is not here (finished already)."""
        found = False
        for sequence in [*self.scheduler.running, *self.scheduler.waiting]:
            if sequence.state.of.task.task_id == task_id:
                found = self.scheduler.remove(sequence.seq_id) is not None or found
        for leader in [k for k, v in self._followers.items() if v[0].state.of.task.task_id == task_id]:
            found = bool(self._followers.pop(leader)) or found
        return found

    def step(self) -> list[GenerationChunk]:
        """Compute one step; the chunks of every task that produced text or ended in it."""
        planned = self.scheduler.plan()
        self.last_step_tokens = sum(p.count for p in planned)
        if not planned:
            return []
        size = self.blocks.block_size
        steps = [SequenceStep(p.start, p.count, self.blocks.table(p.sequence.seq_id), p.samples) for p in planned]
        layout = BatchLayout.build(steps, size, self.model.device, self.model.pad_slot)
        tokens = torch.tensor([t for p in planned for t in p.sequence.tokens[p.start:p.start + p.count]],
                              dtype=torch.long, device=self.model.device)
        logits = self.model.forward_batch(tokens, layout)
        self.scheduler.computed(planned)
        for entry in planned:
            if entry.sequence.prefilled and entry.sequence.seq_id in self._followers:
                for follower in self._followers.pop(entry.sequence.seq_id):
                    self.scheduler.add(follower)
        out: list[GenerationChunk] = []
        for entry, row in zip(_sampling(planned), logits, strict=True):
            out.extend(self._advance(entry.sequence, row[None]))
        return out

    def _advance(self, sequence: Sequence[_Request], logits: torch.Tensor) -> Iterator[GenerationChunk]:
        request = sequence.state
        token_id = int(request.sampler(logits).item())
        sequence.tokens.append(token_id)
        task = request.of.task
        if sequence.generated == 1:
            request.first_token_at = time.perf_counter()
        finish: FinishReason | None = None
        if token_id in self.eos and not task.ignore_eos:
            finish = "stop"
        else:
            text = request.stops.feed(request.detokenizer.add_token(token_id))
            if text:
                yield GenerationChunk(task_id=task.task_id, choice=request.choice, text=text, token_id=token_id)
            if request.stops.stopped:
                finish = "stop"
            elif sequence.generated >= request.max_tokens:
                finish = "length"
        if finish is not None:
            self.scheduler.remove(sequence.seq_id)
            request.of.unfinished -= 1
            yield self._last_chunk(sequence, finish)

    def _last_chunk(self, sequence: Sequence[_Request], finish: FinishReason) -> GenerationChunk:
        request = sequence.state
        tail = "" if request.stops.stopped else request.stops.feed(request.detokenizer.finalize()) + request.stops.flush()
        done = time.perf_counter()
        generated = sequence.generated
        prefill_s = max(request.first_token_at - request.arrived_at, 1e-9)
        decode_s = done - request.first_token_at
        return GenerationChunk(
            task_id=request.of.task.task_id, choice=request.choice, text=tail, finish_reason=finish,
            last=request.of.unfinished == 0,
            usage=Usage(prompt_tokens=sequence.prompt_length, completion_tokens=generated),
            timings=Timings(time_to_first_token_s=prefill_s, prefill_tokens_per_s=sequence.prompt_length / prefill_s,
                            decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0),
        )


def _seq_id(task: TextGenerationTask, choice: int) -> str:
    return task.task_id if task.n == 1 else f"{task.task_id}#{choice}"


def _sampling(planned: list[Planned[_Request]]) -> list[Planned[_Request]]:
    """The entries whose logits the step returns, in the layout's order."""
    return [p for p in planned if p.samples]
