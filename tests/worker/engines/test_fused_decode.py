"""The fused Triton decode step (CUDA's default), run by Triton's interpreter on CPU tensors, against the model's own
eager forward. On a GPU, tests/worker/gpu runs the compiled kernels through the engine."""

from __future__ import annotations

import importlib

import pytest
import torch

from ringlet.models.quant import Int4Embedding, Int8Embedding
from ringlet.models.quant_format import read_rows_int4, round_rows_int8
from tests.support.random_models import BASE, VARIANTS, random_model, sharpened

pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; scripts/test.sh installs it for these tests")

@pytest.fixture(scope="module")
def fused_decode():
    module = importlib.import_module("ringlet.worker.engines.torch.fused_decode")
    if not module._INTERPRETED:
        pytest.skip("a GPU machine: tests/worker/gpu runs these kernels compiled (TRITON_INTERPRET is set by conftest.py only "
                    "where no GPU is)")
    return module


# the interpreter takes seconds a model: the llama variant in the quick run, the others with the slow ones
@pytest.mark.parametrize("variant", [v if v.startswith("llama") else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_fused_step_gives_the_eager_logits_and_cache(fused_decode, variant):
    model = random_model(BASE | VARIANTS[variant], torch.float32)
    eager_cache, fused_cache = model.make_cache(1, 64), model.make_cache(1, 64)
    token, position = torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)
    step = fused_decode.FusedDecodeStep(model, fused_cache, token, position)
    prompt = torch.tensor([[5, 17, 99, 3, 42, 8, 61]])
    with torch.inference_mode():
        for cache in (eager_cache, fused_cache):
            model(prompt, cache, 0)
        ids = [7, 1, 118, 30]
        for offset, next_id in enumerate(ids):
            at = prompt.shape[1] + offset
            want = model(torch.tensor([[next_id]]), eager_cache, at, last_logits_only=True)[:, -1]
            token.fill_(next_id)
            position.fill_(at)
            got = step()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for layer in range(model.num_local_layers):  # the step wrote the new keys (rotated) and values where eager did
        end = prompt.shape[1] + len(ids)
        torch.testing.assert_close(fused_cache.keys[layer][:, :, :end], eager_cache.keys[layer][:, :, :end])
        torch.testing.assert_close(fused_cache.values[layer][:, :, :end], eager_cache.values[layer][:, :, :end])


def test_fused_step_joins_many_splits_of_a_long_prompt(fused_decode):
    """More splits of BLOCK_T positions than the join reads a step of its loop (JOIN_SPLITS)."""
    model = sharpened(random_model(BASE, torch.float32))
    eager_cache, fused_cache = model.make_cache(1, 192), model.make_cache(1, 192)
    token, position = torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)
    step = fused_decode.FusedDecodeStep(model, fused_cache, token, position)
    prompt = torch.arange(3, 3 + 150).view(1, -1) % model.args.vocab_size
    with torch.inference_mode():
        for cache in (eager_cache, fused_cache):
            model(prompt, cache, 0)
        want = model(torch.tensor([[9]]), eager_cache, 150, last_logits_only=True)[:, -1]
        token.fill_(9)
        position.fill_(150)
        got = step()
    assert step.block_t * fused_decode.JOIN_SPLITS < 151 <= step.block_t * step.splits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def one_step(fused_decode, model):
    """(the fused step's logits, the eager forward's) of one token after a five-token prompt."""
    eager_cache, fused_cache = model.make_cache(1, 64), model.make_cache(1, 64)
    token, position = torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)
    step = fused_decode.FusedDecodeStep(model, fused_cache, token, position)
    prompt = torch.tensor([[11, 2, 77, 40, 9]])
    with torch.inference_mode():
        for cache in (eager_cache, fused_cache):
            model(prompt, cache, 0)
        want = model(torch.tensor([[64]]), eager_cache, 5, last_logits_only=True)[:, -1]
        token.fill_(64)
        position.fill_(5)
        return step(), want


def test_fused_step_tracks_eager_bf16_within_rounding(fused_decode):
    got, want = (logits.float() for logits in one_step(fused_decode, random_model(BASE, torch.bfloat16)))
    assert got.dtype == want.dtype and got.shape == want.shape == (1, 120)
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * want.abs().max().item())


def test_models_the_fused_step_cannot_run_are_named(fused_decode):
    model = random_model(BASE | {"head_dim": 24}, torch.float32)
    assert fused_decode.unsupported_reason(model) == "head_dim 24 is not a power of two"
    with pytest.raises(ValueError, match="cannot run this model: head_dim 24"):
        fused_decode.FusedDecodeStep(model, model.make_cache(1, 8), torch.zeros((1, 1), dtype=torch.long),
                                     torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_step_reads_a_quantised_embedding_as_the_eager_forward_does(fused_decode, bits):
    """A quantised stage's embedding is int8 rows with a step each, or 4-bit groups (a CUDA int4 stage's): the
    looked-up rows are scaled back."""
    model = random_model(BASE, torch.float32)
    table = model.embed_tokens.weight.detach()
    model.embed_tokens = (Int8Embedding(round_rows_int8(table), torch.float32) if bits == 8 else
                          Int4Embedding(read_rows_int4(table.shape[0], lambda a, b: table[a:b], table.shape[1], "cpu"),
                                        torch.float32))
    got, want = one_step(fused_decode, model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
