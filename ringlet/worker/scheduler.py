"""Which sequences compute which tokens in the next step: the host-side half of continuous batching.

Sequences wait, then run. A step decodes one token of every running sequence that has its whole prompt in the
cache, and spends what is left of its token budget on prompt chunks: the running sequences' first, then new
sequences admitted from the waiting queue in arrival order (each takes its cached prefix, `blocks.py`). A
prompt's last token is always computed on its own, as a decode is: its logits then come out the same way whether
the prefix was cached or not. When the cache has no room for the next token of every running sequence, the
sequence admitted last goes back to the front of the queue, its blocks freed; it resumes later from its tokens
so far (the prompt and what it generated), and its sampler goes on where it was, so it produces the same tokens.

A pipeline keeps several steps in flight (micro-batches, one a stage): a step then plans only the sequences that no
step in flight computes (`busy`), at most `max_sequences` of them, and never preempts a busy one.

No tensors here: the plan of a step is a list of `Planned` entries; the caller computes them and reports back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ringlet.worker.blocks import BlockManager

State = TypeVar("State")  # what the caller keeps per sequence (sampler, detokeniser, its task)


@dataclass(eq=False)
class Sequence(Generic[State]):
    seq_id: str
    tokens: list[int]  # the prompt, then every generated token
    prompt_length: int
    state: State
    computed: int = 0  # leading tokens whose keys and values are in the cache

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_length

    @property
    def prefilled(self) -> bool:
        """All but the last token are in the cache: the next step decodes."""
        return self.computed >= len(self.tokens) - 1


@dataclass(frozen=True)
class Planned(Generic[State]):
    sequence: Sequence[State]
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """This step computes the sequence's last token: a new token is sampled from its logits."""
        return self.start + self.count == len(self.sequence.tokens)


@dataclass
class Scheduler(Generic[State]):
    blocks: BlockManager
    max_step_tokens: int = 512  # tokens computed in one step, decodes and prompt chunks together
    max_running: int = 64
    waiting: deque[Sequence[State]] = field(default_factory=deque)
    running: list[Sequence[State]] = field(default_factory=list)  # in admission order
    preemptions: int = 0

    def add(self, sequence: Sequence[State]) -> None:
        self.waiting.append(sequence)

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq_id: str) -> Sequence[State] | None:
        """Drop a sequence (finished or cancelled) wherever it is; its blocks go back."""
        for sequence in self.running:
            if sequence.seq_id == seq_id:
                self.running.remove(sequence)
                self.blocks.release(seq_id)
                return sequence
        for sequence in self.waiting:
            if sequence.seq_id == seq_id:
                self.waiting.remove(sequence)
                return sequence
        return None

    def plan(self, busy: frozenset[str] = frozenset(), max_sequences: int | None = None) -> list[Planned[State]]:
        """The next step; empty when nothing can run. `busy`: sequences a step in flight computes, left out."""
        planned: list[Planned[State]] = []
        budget = self.max_step_tokens
        room = self.max_running if max_sequences is None else max_sequences
        for sequence in self._decodable(busy, room):
            planned.append(Planned(sequence, len(sequence.tokens) - 1, 1))
            budget -= 1
        for sequence in self.running:
            if budget > 0 and len(planned) < room and not sequence.prefilled and sequence.seq_id not in busy:
                budget -= self._plan_chunk(sequence, budget, planned)
        while budget > 0 and self.waiting and len(self.running) < self.max_running and len(planned) < room:
            sequence = self.waiting[0]
            if not self.blocks.can_admit(sequence.tokens, reserve=len(self.running)):
                break  # room for the running ones to grow first
            self.waiting.popleft()
            sequence.computed = self.blocks.admit(sequence.seq_id, sequence.tokens)
            self.running.append(sequence)
            if sequence.prefilled:
                self.blocks.reserve(sequence.seq_id, 1)
                planned.append(Planned(sequence, len(sequence.tokens) - 1, 1))
                budget -= 1
            else:
                budget -= self._plan_chunk(sequence, budget, planned)
        return planned

    def computed(self, planned: Iterable[Planned[State]]) -> None:
        """The step ran: each planned sequence's keys and values now cover its planned tokens."""
        for entry in planned:
            sequence = entry.sequence
            if sequence.seq_id not in self.blocks:
                continue  # it ended (a cancel) while a pipeline computed its step
            sequence.computed = entry.start + entry.count
            self.blocks.advance(sequence.seq_id, sequence.tokens[:sequence.computed])

    def requeue_all(self) -> None:
        """Every running sequence back to the front of the queue, in admission order, its blocks freed: it computes
        its tokens so far again when admitted (the cache lost its contents)."""
        for sequence in reversed(self.running):
            self.blocks.release(sequence.seq_id)
            sequence.computed = 0
            self.waiting.appendleft(sequence)
        self.running.clear()

    def _decodable(self, busy: frozenset[str], room: int) -> list[Sequence[State]]:
        """Up to `room` running sequences that decode this step, each with room reserved for its token; preempts to
        make room, the last admitted idle sequence first."""
        ready: list[Sequence[State]] = []
        for sequence in [s for s in self.running if s.prefilled and s.seq_id not in busy]:
            if len(ready) == room:
                break
            if sequence not in self.running:
                continue  # preempted to make room for an earlier one
            while not self.blocks.can_reserve(sequence.seq_id, 1):
                victim = [s for s in self.running if s.seq_id not in busy][-1]  # `sequence` itself is idle
                self._preempt(victim)
                if victim is sequence:
                    break
            else:
                self.blocks.reserve(sequence.seq_id, 1)
                ready.append(sequence)
        return [s for s in ready if s in self.running]

    def _plan_chunk(self, sequence: Sequence[State], budget: int, planned: list[Planned[State]]) -> int:
        """Plan the sequence's next prompt chunk within `budget` (as much as the cache has room for)."""
        count = min(budget, len(sequence.tokens) - 1 - sequence.computed)
        while count > 0 and not self.blocks.can_reserve(sequence.seq_id, count):
            count //= 2
        if count == 0:
            return 0
        self.blocks.reserve(sequence.seq_id, count)
        planned.append(Planned(sequence, sequence.computed, count))
        return count

    def _preempt(self, sequence: Sequence[State]) -> None:
        self.running.remove(sequence)
        self.blocks.release(sequence.seq_id)
        sequence.computed = 0
        self.waiting.appendleft(sequence)
        self.preemptions += 1
