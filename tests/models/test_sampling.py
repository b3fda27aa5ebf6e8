"""Sampler masks on constructed logits, penalties, seeded reproducibility, parameter validation."""

from __future__ import annotations

import pydantic
import pytest
import torch

from ringlet.models.sampling import (
    RequestSampler,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    argmax,
    draw,
    kth_largest,
    make_sampler,
    sort_descending,
)
from ringlet.shared.tasks import SamplingParams

INF = float("-inf")


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert apply_top_k(logits, 2).tolist() == [[INF, 4.0, 3.0, INF, INF]]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = apply_top_p(probs.log(), 0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert apply_top_p(probs.log(), 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert apply_top_p(probs.log(), 0.1).isfinite().sum() == 1  # the top token always stays


def test_top_p_handles_unsorted_and_batches():
    probs = torch.tensor([[0.05, 0.15, 0.5, 0.3], [0.25, 0.25, 0.25, 0.25]])
    kept = apply_top_p(probs.log(), 0.7).isfinite()
    assert kept[0].tolist() == [False, False, True, True]
    assert kept[1].tolist() == [True, True, True, False]  # equally likely: the first ones by id


def test_min_p_relative_to_top():
    probs = torch.tensor([[0.6, 0.3, 0.06, 0.04]])
    assert apply_min_p(probs.log(), 0.1).isfinite().tolist() == [[True, True, False, False]]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    history = torch.tensor([[1, 0, 1, 1]])  # a token seen several times is penalised once
    counts = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), history, counts)
    assert rep.tolist() == [[1.0, -4.0, 1.0, 1.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 1.0]]  # the caller's logits stay as they were
    freq = apply_penalties(logits, SamplingParams(frequency_penalty=0.5), history, counts)
    assert freq.tolist() == [[2.0, -2.0, -0.5, 1.0]]
    pres = apply_penalties(logits, SamplingParams(presence_penalty=0.5), history, counts)
    assert pres.tolist() == [[2.0, -2.0, 0.5, 1.0]]


def test_request_sampler_penalises_its_own_output():
    sampler = RequestSampler(SamplingParams(temperature=0, repetition_penalty=10.0), prompt=[2], vocab_size=4)
    logits = torch.tensor([[1.0, 2.0, 3.0, 2.5]])
    # 2 is in the prompt (3 -> 0.3), so 3 wins; then 3 is in the output too, so 1 wins
    assert [int(sampler(logits)) for _ in range(2)] == [3, 1]
    assert sampler.output_counts.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_a_penalty_window_looks_at_the_last_tokens_only():
    params = SamplingParams(temperature=0, repetition_penalty=10.0, frequency_penalty=1.0, penalty_window=2)
    sampler = RequestSampler(params, prompt=[0, 2, 1], vocab_size=4)
    assert sampler.output_counts.tolist() == [[0.0, 1.0, 1.0, 0.0]], "the window's prompt tokens count"
    logits = torch.tensor([[3.0, 2.0, 2.5, 1.0]])
    # 0 left the window, so it wins; then the window is [1, 0]: 2 (2.5) beats 3 (1.0)
    assert [int(sampler(logits)) for _ in range(2)] == [0, 2]
    assert sampler.output_counts.tolist() == [[1.0, 0.0, 1.0, 0.0]], "what leaves the window stops counting"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_fast_paths_agree_with_torch(dtype):
    """argmax / k-th largest / descending sort go through numpy for float32 CPU tensors; float64 stays in torch."""
    logits = torch.tensor([[0.5, 3.0, float("-inf"), 3.0, -1.0], [float("-inf")] * 4 + [0.0]], dtype=dtype)
    assert argmax(logits).tolist() == [1, 4]  # the first of equal maxima
    assert kth_largest(logits, 2).tolist() == [[3.0], [float("-inf")]]
    assert kth_largest(logits, 3).tolist() == [[0.5], [float("-inf")]]
    assert sort_descending(logits).tolist() == [[3.0, 3.0, 0.5, -1.0, float("-inf")], [0.0] + [float("-inf")] * 4]
    assert argmax(logits).dtype == torch.int64


def test_draw_never_picks_an_impossible_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1e-30]]).repeat(2000, 1)
    drawn = draw(probs, torch.Generator().manual_seed(5))
    assert set(drawn[0::2].tolist()) == {1, 3} and set(drawn[1::2].tolist()) == {4}
    share = (drawn[0::2] == 1).float().mean().item()
    assert 0.45 < share < 0.55


def test_greedy_is_argmax():
    sampler = make_sampler(SamplingParams(temperature=0))
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 0.0]])
    assert sampler(logits, torch.zeros(0), torch.zeros(0)).tolist() == [1, 0]


def test_seed_reproducible_and_distribution_follows_probs():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=1.0, seed=1234)
    a = make_sampler(params)(logits, torch.zeros(0), torch.zeros(0))
    b = make_sampler(params)(logits, torch.zeros(0), torch.zeros(0))
    c = make_sampler(SamplingParams(temperature=1.0, seed=99))(logits, torch.zeros(0), torch.zeros(0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=4).float() / len(a)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


def test_sampling_respects_top_k_mask():
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0]]).repeat(500, 1)
    drawn = make_sampler(SamplingParams(temperature=2.0, top_k=2, seed=0))(logits, torch.zeros(0), torch.zeros(0))
    assert set(drawn.tolist()) == {0, 1}


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2},
                                 {"top_k": -3}, {"repetition_penalty": 0}, {"presence_penalty": 3},
                                 {"frequency_penalty": -2.5}, {"seed": -1}, {"unknown": 1}])
def test_bad_params_rejected_with_field_name(bad):
    with pytest.raises(pydantic.ValidationError) as info:
        SamplingParams(**bad)
    assert next(iter(bad)) in str(info.value)


def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0]])
    kept = apply_top_p(logits, 7e-289)
    assert torch.isfinite(kept).tolist() == [[False, True, False, False]]


def test_logit_bias_moves_the_draw_and_names_ids_beyond_the_vocabulary():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    other = (best + 1) % 64
    for params in (SamplingParams(temperature=0, logit_bias={other: 100.0}),
                   SamplingParams(temperature=0.7, seed=1, logit_bias={other: 100.0})):
        sampler = RequestSampler(params, [1], 64)
        assert not sampler.plain_greedy and int(sampler(logits).item()) == other
    banned = RequestSampler(SamplingParams(temperature=0, logit_bias={best: -100.0}), [1], 64)
    assert int(banned(logits).item()) != best
    assert int(logits.argmax()) == best, "the engine's logits are left as they were"
    with pytest.raises(ValueError, match=r"token ids \[64\] beyond the model's 64 tokens"):
        RequestSampler(SamplingParams(logit_bias={64: 1.0}), [1], 64)


def test_logprobs_report_the_drawn_token_and_the_most_likely_ones():
    from ringlet.models.random_checkpoint import synthetic_tokenizer

    tokenizer = synthetic_tokenizer(64)
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)) * 3
    expected = torch.log_softmax(logits[0], -1)
    greedy = RequestSampler(SamplingParams(temperature=0, logprobs=4), [1], 64, tokenizer=tokenizer)
    token = int(greedy(logits).item())
    assert not greedy.plain_greedy and greedy.last_logprobs is not None
    assert greedy.last_logprobs.token == tokenizer.decode([token])
    assert greedy.last_logprobs.logprob == pytest.approx(float(expected.max()))
    assert [t.logprob for t in greedy.last_logprobs.top] == pytest.approx(expected.topk(4).values.tolist())
    sampled = RequestSampler(SamplingParams(temperature=1.0, seed=2, logprobs=0), [1], 64, tokenizer=tokenizer)
    token = int(sampled(logits).item())
    assert sampled.last_logprobs is not None and sampled.last_logprobs.top == []
    assert sampled.last_logprobs.logprob == pytest.approx(float(expected[token]))
    with pytest.raises(ValueError, match="tokenizer"):
        RequestSampler(SamplingParams(logprobs=1), [1], 64)
