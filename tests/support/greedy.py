"""Greedy runs of an engine and where they part from a reference: how engines are compared with the fp32 CPU
engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask
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
    engine.generator.cached = []
    with torch.inference_mode():
        text = "".join(chunk.text for chunk in engine.generate(task))
    prompt = prompt_ids(engine.generator.tokenizer, task)
    cached = list(engine.generator.cached)
    assert cached[:len(prompt)] == prompt
    return GreedyRun(prompt, cached[len(prompt):], text)


def greedy_with_logits(engine, task: TextGenerationTask) -> tuple[GreedyRun, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    """A greedy run and the logits each generated token was picked from."""
    logits: list[torch.Tensor] = []
    forward = engine.generator.forward

    def recording(ids: torch.Tensor, start: int) -> torch.Tensor:
        out = forward(ids, start)
        logits.append(out[0].float())
        return out

    engine.generator.forward = recording
    try:
        run = run_greedy(engine, task)
    finally:
        engine.generator.forward = forward
    # one forward per prefill chunk, then one per token; the last token picked is never fed back
    picks = logits[len(logits) - len(run.generated) - 1:]
    return run, picks[:len(run.generated)]


def teacher_forced_logits(engine, reference: GreedyRun) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The engine's logits for each reference token, fed the reference stream the way generation feeds its
    own: the prompt in one prefill, then one token per step (prefill and decode round differently)."""
    forward, ids, start = engine.generator.forward, reference.prompt + reference.generated, len(reference.prompt)
    engine.generator.cached = []  # the next generation must not reuse what this writes into the cache
    device = engine.generator.device  # where the engine's own loop puts token ids
    with torch.inference_mode():
        steps = [forward(torch.tensor([reference.prompt], device=device), 0)[0].float()]
        steps += [forward(torch.tensor([[ids[i]]], device=device), i)[0].float() for i in range(start, len(ids) - 1)]
    return steps


def compare_with_reference(engine, reference: GreedyRun, reference_logits: list[torch.Tensor]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Where the engine's greedy stream parts from the fp32 reference, and why.

    Up to the parting the engine's own choices were the reference tokens (gap 0). Past it, the engine is fed
    the reference stream, and each step's gap is how far below its best logit it ranks the reference token.
    At the parting, the reference's own fp32 margin between the two candidates shows whether it was a near tie.
    """
    run, logits = greedy_with_logits(engine, greedy_task())
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


