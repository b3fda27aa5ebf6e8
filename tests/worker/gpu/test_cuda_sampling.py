"""Sampling on a CUDA device: the same masks as on the CPU (whose sort, top-k and argmax go through numpy), a
seeded draw that repeats and follows the probabilities. Skipped without a GPU; run through the device tool."""

from __future__ import annotations

import pytest
import torch

from ringlet.models.sampling import RequestSampler, apply_top_k, apply_top_p, make_sampler
from ringlet.shared.tasks import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_masks_match_the_cpu():
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(0)) * 3
    for mask in (lambda x: apply_top_k(x, 40), lambda x: apply_top_p(x, 0.9), lambda x: apply_top_p(x, 0.3)):
        cpu, gpu = mask(logits).isfinite(), mask(logits.cuda()).isfinite().cpu()
        assert torch.equal(cpu, gpu)


def test_seeded_draw_repeats_and_follows_probs():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]], device="cuda").repeat(20000, 1)
    params = SamplingParams(temperature=1.0, seed=7)
    empty = torch.zeros(0, device="cuda")
    a = make_sampler(params, "cuda")(logits, empty, empty)
    b = make_sampler(params, "cuda")(logits, empty, empty)
    assert a.device.type == "cuda" and torch.equal(a, b)
    share = torch.bincount(a, minlength=4).float() / len(a)
    torch.testing.assert_close(share, logits[0].softmax(-1), atol=0.015, rtol=0)


def test_request_sampler_with_penalties_stays_on_the_gpu():
    sampler = RequestSampler(SamplingParams(temperature=0, repetition_penalty=10.0, frequency_penalty=0.5),
                             prompt=[2], vocab_size=4, device="cuda")
    logits = torch.tensor([[1.0, 2.0, 3.0, 2.5]], device="cuda")
    assert [int(sampler(logits)) for _ in range(2)] == [3, 1]
    assert sampler.history.device.type == "cuda"
