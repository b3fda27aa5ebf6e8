"""What the scheduler plans for a step, without tensors: bursts of prompts, mixed steps, and a full cache."""

from __future__ import annotations

from ringlet.worker.blocks import BlockManager
from ringlet.worker.scheduler import Planned, Scheduler, Sequence
from tests.support.scripts import load_script


class Steps:
    """A clock that moves `step` seconds each time it is read: the scheduler reads it once a step."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def sequence(seq_id: str, prompt: int) -> Sequence[None]:
    first = 1000 * ord(seq_id)  # prompts of different ids share no prefix
    return Sequence(seq_id, list(range(first, first + prompt)), prompt, None)


def run(scheduler: Scheduler[None], planned: list[Planned[None]]) -> None:
    """Report the step computed, and give each sampling sequence its token."""
    scheduler.computed(planned)
    for entry in planned:
        if entry.samples:
            entry.sequence.tokens.append(7)


def generating(scheduler: Scheduler[None], *ids: str) -> None:
    """Admit prompts of 8 tokens and step until each has sampled a token."""
    for seq_id in ids:
        scheduler.add(sequence(seq_id, 8))
    while any(s.generated == 0 for s in [*scheduler.running, *scheduler.waiting]):
        run(scheduler, scheduler.plan())


def shape(planned: list[Planned[None]]) -> dict[str, int]:
    return {entry.sequence.seq_id: entry.count for entry in planned}


def test_a_burst_of_prompts_fills_at_full_width_and_the_generating_streams_decode_every_few_steps() -> None:
    # steps of 30 ms, pauses of at most 130 ms: three steps sit out, the fourth decodes
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=256, block_size=4), max_step_tokens=64,
                                           burst_pause=0.13, clock=Steps(0.03))
    generating(scheduler, "a", "b")
    for seq_id in ("p", "q", "r", "s"):
        scheduler.add(sequence(seq_id, 100))
    steps = []
    for _ in range(8):
        planned = scheduler.plan()
        steps.append(shape(planned))
        run(scheduler, planned)
    assert steps[0] == {"p": 64}, "the generating sequences sit out while prompts fill the whole step"
    assert steps[1] == {"p": 35, "q": 29}
    assert steps[2] == {"p": 1, "q": 63}, "a filled prompt samples its first token in the next step"
    assert steps[3] == {"a": 1, "b": 1, "p": 1, "q": 7, "r": 54}, "after `burst_yield` steps every sequence decodes"
    assert steps[4] == {"q": 1, "r": 45, "s": 18}
    assert steps[5] == {"r": 1, "s": 63}
    assert steps[6] == {"a": 1, "b": 1, "p": 1, "q": 1, "r": 1, "s": 18}, "what is left of the prompts fits a step"
    assert steps[7] == dict.fromkeys("abpqrs", 1)


def test_a_few_prompts_at_once_are_filled_beside_the_decodes() -> None:
    # 30 ms steps fill 64 tokens each: a pause of 130 ms fills about 277 tokens, more than these prompts have
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=256, block_size=4), max_step_tokens=64,
                                           burst_pause=0.13, clock=Steps(0.03))
    generating(scheduler, "a", "b")
    for seq_id in ("p", "q"):
        scheduler.add(sequence(seq_id, 100))
    planned = scheduler.plan()
    assert shape(planned) == {"a": 1, "b": 1, "p": 62}
    run(scheduler, planned)
    assert shape(scheduler.plan()) == {"a": 1, "b": 1, "p": 37, "q": 25}
    assert not scheduler.bursting


def test_where_a_step_outlasts_the_pause_every_step_decodes() -> None:
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=256, block_size=4), max_step_tokens=64,
                                           burst_pause=0.25, clock=Steps(0.3))
    generating(scheduler, "a", "b")
    scheduler.add(sequence("p", 200))
    assert shape(scheduler.plan()) == {"a": 1, "b": 1, "p": 62}
    assert shape(scheduler.plan()) == {"a": 1, "b": 1, "p": 62}


def test_a_prompt_that_fits_in_the_step_is_filled_beside_the_decodes() -> None:
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=256, block_size=4), max_step_tokens=64,
                                           clock=Steps(0.01))
    generating(scheduler, "a", "b")
    scheduler.add(sequence("p", 40))
    assert shape(scheduler.plan()) == {"a": 1, "b": 1, "p": 39}
    assert scheduler.decoded_at == scheduler.planned_at


def test_prompts_beyond_the_running_limit_are_no_burst() -> None:
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=256, block_size=4), max_step_tokens=64,
                                           max_running=2, burst_pause=0.02, clock=Steps(0.01))
    generating(scheduler, "a", "b")
    scheduler.add(sequence("p", 200))  # more than the 128 tokens two steps fill
    assert shape(scheduler.plan()) == {"a": 1, "b": 1}, "a prompt that cannot be admitted stops no one"
    assert not scheduler.bursting


def test_a_prompt_the_cache_has_no_room_for_stops_no_one() -> None:
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=12, block_size=4), max_step_tokens=16,
                                           burst_pause=0.02, clock=Steps(0.01))
    generating(scheduler, "a", "b")  # 9 tokens each, 3 blocks each
    scheduler.add(sequence("p", 100))  # more than the 32 tokens two steps fill, and than the 6 free blocks hold
    for _ in range(3):
        planned = scheduler.plan()
        assert shape(planned) == {"a": 1, "b": 1} and not scheduler.bursting
        run(scheduler, planned)
    assert [s.seq_id for s in scheduler.waiting] == ["p"]


def test_a_prompt_whose_chunk_finds_no_room_stops_no_one() -> None:
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=64, block_size=4), max_step_tokens=16,
                                           burst_pause=0.05, clock=Steps(0.01))
    generating(scheduler, "a")  # 9 tokens in 3 blocks: room for its next token
    scheduler.add(sequence("p", 200))
    planned = scheduler.plan()
    assert shape(planned) == {"p": 16}, "p is admitted, a burst: `a` sits out"
    run(scheduler, planned)
    blocks = scheduler.blocks
    blocks.admit("other", [1])
    blocks.reserve("other", 4 * blocks.free_blocks)  # someone else takes every free block
    planned = scheduler.plan()
    assert shape(planned) == {"a": 1}, "the burst is predicted, no chunk fits: the generating sequence decodes"
    assert scheduler.decoded_at == scheduler.planned_at


def test_modelled_on_a_gpu_a_round_of_prompts_at_once_keeps_the_token_gaps_of_decoding() -> None:
    simulation = load_script("simulate_scheduler")
    single = simulation.simulate(0.25, clients=1)
    p95 = simulation.Result.percentile
    mixed, burst = simulation.simulate(0.0), simulation.simulate(0.25)
    assert p95(mixed.gaps, 0.95) > 3 * p95(single.gaps, 0.95), "every step fills a prompt: slow tokens"
    assert p95(burst.gaps, 0.95) < 2 * p95(single.gaps, 0.95)
    assert max(burst.gaps) <= 0.25 + 0.02, "no stream waits much past the pause"
    assert p95(burst.ttft, 0.5) <= p95(mixed.ttft, 0.5)


def test_modelled_on_a_gpu_prompts_arriving_spread_out_are_filled_beside_the_decodes() -> None:
    simulation = load_script("simulate_scheduler")
    mixed = simulation.simulate(0.0, requests_per_client=3, think=0.5)
    burst = simulation.simulate(0.25, requests_per_client=3, think=0.5)
    assert burst.gaps == mixed.gaps and burst.ttft == mixed.ttft


def test_steps_planned_at_one_instant_plan_as_usual() -> None:
    scheduler: Scheduler[None] = Scheduler(BlockManager(num_blocks=256, block_size=4), max_step_tokens=64,
                                           clock=lambda: 1.0)
    generating(scheduler, "a")
    scheduler.add(sequence("p", 100))
    assert shape(scheduler.plan()) == {"a": 1, "p": 63}
