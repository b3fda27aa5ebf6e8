"""For the tests that need a CUDA GPU: their mark (they skip cleanly without one, as in CI, and run through the device
tool), and how a quantised engine's greedy path is held against its reference's."""

from __future__ import annotations

import pytest
import torch

from ringlet.shared.tasks import SamplingParams, TextGenerationTask


def on_gpu(test):  # type: ignore[no-untyped-def]
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


Greedy = tuple[list[int], list[dict[str, float]]]


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def assert_tracks(got: Greedy, expected: Greedy, atol: float = 0.05) -> None:
    """The engine follows the reference's greedy path: at every step where both read the same tokens (up to and
    including the first that differs), the reference's likeliest token is among the engine's five, and the
    log-probabilities of the tokens both list agree within `atol`; a different choice is a near-tie of the reference.
    A random model's logits are nearly flat (its top two differ by 0.02-0.7 nats, its bf16 logits step by 0.016), so
    the rounding of the activations may pick either of a near-tie."""
    (tokens, tops), (ref_tokens, ref_tops) = got, expected
    same = agreement(tokens, ref_tokens)
    for step in range(min(same + 1, len(tokens))):
        assert max(ref_tops[step], key=ref_tops[step].__getitem__) in tops[step], step
        for token in tops[step].keys() & ref_tops[step].keys():
            assert abs(tops[step][token] - ref_tops[step][token]) <= atol, (step, token, tops[step], ref_tops[step])
    if same < len(tokens):
        ranked = sorted(ref_tops[same].values(), reverse=True)
        assert ranked[0] - ranked[1] <= 2 * atol, (same, ranked)


def greedy_texts(engine, prompt: str, n: int  # type: ignore[no-untyped-def]
                 ) -> tuple[list[str], list[dict[str, float]]]:
    """`n` greedy tokens of `prompt` by their text (a byte-level chunk may complete several tokens), and at each the
    five likeliest tokens' log-probabilities by text, leaving out the texts several tokens share (a byte of a
    character alone reads as U+FFFD), which name no one token."""
    task = TextGenerationTask(prompt=prompt, max_tokens=n, ignore_eos=True,
                              sampling=SamplingParams(temperature=0, logprobs=5))
    drawn = [token for chunk in engine.generate(task) for token in chunk.logprobs or []]
    assert len(drawn) == n
    return [token.token for token in drawn], [{top.token: top.logprob for top in token.top if "\ufffd" not in top.token}
                                              for token in drawn]
