"""The fused Triton decode step (CUDA's default), run by Triton's interpreter on CPU tensors, against the model's own
eager forward. On a GPU, tests/worker/gpu runs the compiled kernels through the engine."""

from __future__ import annotations

import importlib

import pytest
import torch

from ringlet.models.quant import Int4Embedding, Int8Embedding
from ringlet.models.quant_format import read_rows_int4, round_rows_int8
from tests.support.random_models import BASE, VARIANTS, int4_projections, random_model, sharpened

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


@pytest.mark.parametrize(("variant", "lm_head"), [("llama (3 query heads a key head, tied lm_head)", "int4"),
                                                  ("qwen2 (q/k/v biases, untied lm_head)", "int8")])
def test_int4_projections_read_inputs_rounded_once_as_those_rounding_their_own(fused_decode, monkeypatch, variant,
                                                                               lm_head):
    """Int4 projections read int8 vectors written by the kernel before (the attention for o, o for gate/up, gate/up
    for down, down for the next layer's q/k/v and an int4 lm_head, with the norms' weights in): the same logits and
    cache as projections that round their input themselves, at a position of one attention split and at positions
    whose splits are joined. Programs of 16 rows (o, down) complete a block of 32 in pairs; gate/up's of 32 write
    theirs alone."""
    config = BASE | VARIANTS[variant] | {"head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    results = []
    for int8_inputs in (True, False):
        monkeypatch.setattr(fused_decode.FusedDecodeStep, "int8_inputs", int8_inputs)
        model = int4_projections(random_model(config, torch.bfloat16), lm_head)
        cache = model.make_cache(1, 64)
        generator = torch.Generator().manual_seed(4)
        for tensor in (*cache.keys, *cache.values):  # the positions before those decoded here
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        token, position = torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)
        step = fused_decode.FusedDecodeStep(model, cache, token, position)
        assert (step.vectors is not None) == int8_inputs
        assert not int8_inputs or bool(step.vectors["lm_head"]) == (lm_head == "int4")
        logits = []
        with torch.inference_mode():
            for at, next_id in ((5, 17), (20, 99)):
                token.fill_(next_id)
                position.fill_(at)
                logits.append(step().clone())
        results.append((torch.cat(logits), cache))
    (got, got_cache), (want, want_cache) = results
    assert torch.equal(got, want)
    for layer in range(len(got_cache.keys)):
        assert torch.equal(got_cache.keys[layer], want_cache.keys[layer])
        assert torch.equal(got_cache.values[layer], want_cache.values[layer])
