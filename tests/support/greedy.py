"""Greedy runs of an engine and where they part from a reference: how engines are compared with the fp32 CPU
engine. An engine is either one-sequence (its `generator` loop) or a batch model (`forward_batch`, run by the
batching loop): the runs read what each fed to its model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ringlet.models.paged_cache import CacheLost, SequenceStep
from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask
from ringlet.worker.batching import BatchGenerator
from ringlet.worker.engines.torch.generate import prompt_ids

COMPARED_TOKENS = 32


def greedy_task(content: str = "Tell me a short story about a dog.", tokens: int = COMPARED_TOKENS) -> TextGenerationTask:
    # one more than compared: the loop stops before feeding its last token back, so that one never enters
    # the cache the ids are read from
    return TextGenerationTask(messages=[ChatMessage(role="user", content=content)], max_tokens=tokens + 1,
                              ignore_eos=True, sampling=SamplingParams(temperature=0))


@dataclass(frozen=True)
class GreedyRun:
    prompt: list[int]
    generated: list[int]
    text: str


def run_greedy(engine, task: TextGenerationTask) -> GreedyRun:  # type: ignore[no-untyped-def]
    """One greedy run from a cold cache: the prompt's ids, the generated ids (all but the last), the text."""
    return greedy_with_logits(engine, task)[0]


def greedy_with_logits(engine, task: TextGenerationTask) -> tuple[GreedyRun, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    """A greedy run and the logits each generated token was picked from."""
    fed: list[int] = []  # a batch model's: every token id it computed, the prompt, then all but the last generated
    logits: list[torch.Tensor] = []
    batched = not hasattr(engine, "generator")
    owner = engine if batched else engine.generator
    forward = owner.forward_batch if batched else owner.forward

    def recording(ids: torch.Tensor, where):  # type: ignore[no-untyped-def]
        try:
            out = forward(ids, where)
        except CacheLost:  # the batch computes every sequence again, from its first token
            fed.clear()
            logits.clear()
            raise
        fed.extend(ids.view(-1).tolist())
        logits.extend(row.float() for row in out.view(-1, out.shape[-1]))
        return out

    if not batched:
        engine.generator.cached = []
    setattr(owner, "forward_batch" if batched else "forward", recording)
    try:
        with torch.inference_mode():
            text = "".join(chunk.text for chunk in engine.generate(task))
    finally:
        setattr(owner, "forward_batch" if batched else "forward", forward)
    prompt = prompt_ids(owner.tokenizer, task)
    if not batched:  # its prompt chunks go to the cache by another call: the ids are its cache's
        fed = list(engine.generator.cached)
    assert fed[:len(prompt)] == prompt
    run = GreedyRun(prompt, fed[len(prompt):], text)
    # the last prompt token's logits, then one row per generated token; the last token picked is never fed back
    picks = logits[len(logits) - len(run.generated) - 1:]
    return run, picks[:len(run.generated)]


def teacher_forced_logits(engine, reference: GreedyRun) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The engine's logits for each reference token, fed the reference stream the way generation feeds its
    own: the prompt in one prefill (a batch model: all but its last token, then that one), then one token per
    step (prefill and decode round differently)."""
    ids, start = reference.prompt + reference.generated, len(reference.prompt)
    with torch.inference_mode():
        if hasattr(engine, "generator"):
            forward = engine.generator.forward
            engine.generator.cached = []  # the next generation must not reuse what this writes into the cache
            device = engine.generator.device  # where the engine's own loop puts token ids
            steps = [forward(torch.tensor([reference.prompt], device=device), 0)[0].float()]
            return steps + [forward(torch.tensor([[ids[i]]], device=device), i)[0].float()
                            for i in range(start, len(ids) - 1)]
        # the cache's first blocks, as a sequence alone would have them
        table = list(range(-(-len(ids) // engine.block_size)))
        engine.forward_batch(torch.tensor(reference.prompt[:-1]), [SequenceStep(0, start - 1, table, False)])
        return [engine.forward_batch(torch.tensor([ids[i]]), [SequenceStep(i, 1, table)])[0].float()
                for i in range(start - 1, len(ids) - 1)]


def compare_with_reference(engine, reference: GreedyRun, reference_logits: list[torch.Tensor],  # type: ignore[no-untyped-def]
                           task: TextGenerationTask | None = None) -> dict[str, object]:
    """Where the engine's greedy stream parts from the fp32 reference, and why.

    Up to the parting the engine's own choices were the reference tokens (gap 0). Past it, the engine is fed
    the reference stream, and each step's gap is how far below its best logit it ranks the reference token.
    At the parting, the reference's own fp32 margin between the two candidates shows whether it was a near tie.
    """
    run, logits = greedy_with_logits(engine, task or greedy_task())
    pairs = zip(run.generated, reference.generated)
    parted = next((i for i, (a, b) in enumerate(pairs) if a != b), len(reference.generated))
    if parted < len(reference.generated):
        logits = teacher_forced_logits(engine, reference)
    gaps = [float(step.max() - step[token]) for step, token in zip(logits, reference.generated)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    detail: dict[str, object] = {"text": run.text, "identical_tokens": parted, "of": len(reference.generated),
                                 "worst_gap": round(gaps[worst], 4), "worst_gap_step": worst}
    if parted < len(reference.generated):
        ours, theirs = run.generated[parted], reference.generated[parted]
        at = reference_logits[parted]
        detail["reference_margin_at_parting"] = round(float(at[theirs] - at[ours]), 4)
        detail["gap_at_parting"] = round(gaps[parted], 4)
    return detail


def assert_parting_is_a_near_tie(detail: dict[str, object], tolerance: float) -> None:
    assert float(detail["worst_gap"]) <= tolerance, detail  # type: ignore[arg-type]
    if "reference_margin_at_parting" in detail:
        assert float(detail["reference_margin_at_parting"]) <= tolerance, detail  # type: ignore[arg-type]




def batch_tokens(engine: Any, tasks: list[TextGenerationTask]) -> dict[str, list[int]]:
    """Each task's generated token ids, the tasks run together by the batching loop over `engine` (a batch model)."""
    generator = BatchGenerator(engine, engine.config.max_step_tokens, engine.config.max_batch)
    for task in tasks:
        generator.submit(task)
    tokens: dict[str, list[int]] = {task.task_id: [] for task in tasks}
    while generator:
        for chunk in generator.step():
            if chunk.token_id is not None:
                tokens[chunk.task_id].append(chunk.token_id)
    return tokens
