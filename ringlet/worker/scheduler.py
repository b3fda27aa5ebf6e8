"""Which sequences compute which tokens in the next step: the host-side half of continuous batching.

Sequences wait, then run. A step decodes one token of every running sequence that has its whole prompt in the
cache, and spends what is left of its token budget on prompt chunks: the running sequences' first, then new
sequences admitted from the waiting queue in arrival order (each takes its cached prefix, `blocks.py`). A
prompt's last token is always computed on its own, as a decode is: its logits then come out the same way whether
the prefix was cached or not. When the cache has no room for the next token of every running sequence, the
sequence admitted last goes back to the front of the queue, its blocks freed; it resumes later from its tokens
so far (the prompt and what it generated), and its sampler goes on where it was, so it produces the same tokens.

A burst of prompts, more of them at once than the steps of one pause fill at a step's pace, is filled first where
steps are short: the sequences that have sampled a token sit out of the steps that fill it, as long as each waits
at most `burst_pause` seconds for its next token; then one step decodes them all; until what is left of the burst
fits in one step. Each step then fills prompts at the budget's full width and samples the first token of those it
filled, so a prompt's first token comes as soon as its own chunks are computed, and a stream already generating
waits through a few pauses instead of each of its tokens waiting on a share of every prompt. Prompts that arrive a
few at a time are filled beside the decodes, and where a step alone takes longer than the pause (a CPU), every step
decodes.

A pipeline keeps several steps in flight (micro-batches, one a stage): a step then plans only the sequences that no
step in flight computes (`busy`), at most `max_sequences` of them, and never preempts a busy one.

No tensors here: the plan of a step is a list of `Planned` entries; the caller computes them and reports back.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
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
    burst_pause: float = 0.25  # seconds a generating sequence may wait while a burst of prompts fills (0: none)
    clock: Callable[[], float] = time.monotonic
    waiting: deque[Sequence[State]] = field(default_factory=deque)
    running: list[Sequence[State]] = field(default_factory=list)  # in admission order
    preemptions: int = 0
    planned_at: float = float("-inf")  # when the last step was planned
    decoded_at: float = float("-inf")  # when the last step that decodes every sequence was planned
    bursting: bool = False  # a burst of prompts is being filled

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
        now = self.clock()
        step = now - self.planned_at  # a step lasts about as long as the last one
        # should the generating sequences sit out this step, they wait from their last token to its end
        yielding = now - self.decoded_at + step <= self.burst_pause and self._burst(busy, room, step)
        self.planned_at = now
        if not yielding:
            self.decoded_at = now
        sitting = frozenset(s.seq_id for s in self.running if yielding and s.generated > 0)
        for sequence in self._decodable(busy | sitting, room):
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
        if sitting and all(entry.samples for entry in planned):
            # no prompt could be filled after all (the cache has no room): the generating sequences decode
            for sequence in self._decodable(busy | {entry.sequence.seq_id for entry in planned}, room - len(planned)):
                planned.append(Planned(sequence, len(sequence.tokens) - 1, 1))
            self.decoded_at = now
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

    def _burst(self, busy: frozenset[str], room: int, step: float) -> bool:
        """Whether a burst is being filled: one starts when the prompt tokens that can be filled now (the running
        sequences' unfilled ones, then those of the waiting sequences that would be admitted, less their cached
        prefixes) take longer than a pause to fill at `step` seconds a step, and lasts while they fill more than
        one step."""
        steps = 1.0 if self.bursting else max(1.0, self.burst_pause / max(step, 1e-6))
        enough = self.max_step_tokens * steps
        pending = sum(len(s.tokens) - 1 - s.computed for s in self.running if not s.prefilled and s.seq_id not in busy)
        admissible = max(0, min(self.max_running - len(self.running), room))
        for sequence in itertools.islice(self.waiting, admissible):
            if pending > enough or not self.blocks.can_admit(sequence.tokens, len(self.running)):
                break
            cached = len(self.blocks.cached_prefix(sequence.tokens)) * self.blocks.block_size
            pending += len(sequence.tokens) - 1 - cached
        self.bursting = pending > enough
        return self.bursting

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
