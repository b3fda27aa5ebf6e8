"""Each rope_scaling type against transformers at positions past its original length: tiny random-weight checkpoints
built by transformers' own config and model classes, read by ringlet's safetensors loader, logits compared in fp32
over a whole sequence, through the static KV cache (a prefill, then one token at a time) and through the packed
forward over the paged cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

from ringlet.models import safetensors_loader
from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.paged_cache import BatchLayout, SequenceStep
from ringlet.models.registry import build_stage, model_args
from ringlet.models.rope import rope_frequencies
from ringlet.shared.errors import ModelLoadError

ORIGINAL = 32  # the rope scaling's pretraining length; the sequences run to LENGTH, well past it
LENGTH = 100
PREFILL = 40  # past ORIGINAL: from there on transformers' longrope takes its long factors, as ringlet's does
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}
HALF = TINY["hidden_size"] // TINY["num_attention_heads"] // 2  # frequencies of a head
SHORT = [1.0 + 0.1 * i for i in range(HALF)]
LONG = [1.0 + 0.9 * i for i in range(HALF)]

SCALINGS = {
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 4.0}),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": ORIGINAL}),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "yarn, beta_fast/slow, mscale over mscale_all_dim, untruncated": ("llama", {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 4,
        "beta_slow": 0.25, "mscale": 1.5, "mscale_all_dim": 0.5, "truncate": False}),
    "yarn, attention_factor given": ("llama", {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.25,
                                               "original_max_position_embeddings": ORIGINAL}),
    "yarn on qwen2, as Qwen2.5 writes it": ("qwen2", {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": ORIGINAL}),
    "longrope": ("llama", {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                           "original_max_position_embeddings": ORIGINAL}),
    "longrope, factor given": ("llama", {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                         "factor": 8.0, "original_max_position_embeddings": ORIGINAL}),
    "longrope, attention_factor given": ("llama", {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                                   "attention_factor": 0.8, "original_max_position_embeddings": ORIGINAL}),
}
CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
HF_CLASSES = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}


def make_checkpoint(model_type: str, scaling: dict, path: Path, **config: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    hf_config = CONFIGS[model_type](**(TINY | config), rope_scaling=dict(scaling))
    model = HF_CLASSES[model_type](hf_config).eval()
    with torch.no_grad():  # random norms and biases; queries and keys large enough that attention is not uniform,
        for name, p in model.named_parameters():  # so that a wrong rotation shows
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10)
    model.save_pretrained(path)
    return model


def load(path: Path, rope_scaling: str = "as saved") -> Transformer:
    args = model_args(safetensors_loader.read_config(path))
    if rope_scaling == "none":
        args = dataclasses.replace(args, rope_scaling=None)
    weights = safetensors_loader.lazy_weights(path, 0, args.num_hidden_layers, args.num_hidden_layers,
                                              args.tie_word_embeddings)
    return build_stage(args, weights=weights)  # type: ignore[return-value]


@pytest.fixture(scope="module", params=sorted(SCALINGS))
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    model_type, scaling = SCALINGS[request.param]
    path = tmp_path_factory.mktemp("rope")
    reference = make_checkpoint(model_type, scaling, path)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, LENGTH))
    with torch.no_grad():
        expected = reference(ids).logits
    return request.param, path, ids, expected


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_whole_sequence_matches_transformers(checkpoint):  # type: ignore[no-untyped-def]
    name, path, ids, expected = checkpoint
    model = load(path)
    close(model(ids, model.make_cache(2, LENGTH), 0), expected)
    if name == "dynamic":
        return  # within the model's length it rotates as the default does (see the test of a longer context)
    # the scaling is what makes them equal: without it the positions past the original length come out otherwise
    plain = load(path, rope_scaling="none")
    differs = (plain(ids, plain.make_cache(2, LENGTH), 0) - expected)[:, ORIGINAL:].abs().amax()
    assert differs > 1e-2


@torch.no_grad()
def test_cached_decode_matches_transformers(checkpoint):  # type: ignore[no-untyped-def]
    """A prefill, then one token at a time: alternately at an int position and as the static (CUDA-graph) step runs,
    a tensor position over the whole cache under a mask."""
    _, path, ids, expected = checkpoint
    model = load(path)
    cache = model.make_cache(2, TINY["max_position_embeddings"])
    close(model(ids[:, :PREFILL], cache, 0), expected[:, :PREFILL])
    for p in range(PREFILL, LENGTH):
        start = p if p % 2 else torch.tensor([p])
        logits = model(ids[:, p:p + 1], cache, start, kv_len=None if p % 2 else TINY["max_position_embeddings"])
        close(logits[:, 0], expected[:, p])


@torch.no_grad()
def test_packed_forward_over_the_paged_cache_matches_transformers(checkpoint):  # type: ignore[no-untyped-def]
    """The batching engine's path: tables from `prepare_positions`, a prompt chunk each, then both sequences decoding
    in one step."""
    _, path, ids, expected = checkpoint
    model = load(path)
    model.prepare_positions(TINY["max_position_embeddings"])
    block = 16
    cache = model.make_paged_cache(2 * LENGTH // block + 2, block)
    tables = [list(range(7)), list(range(7, 14))]
    for row, blocks in enumerate(tables):
        layout = BatchLayout.build([SequenceStep(0, PREFILL, blocks)], block, "cpu", cache.pad_slot)
        close(model.forward_batch(ids[row, :PREFILL], cache, layout)[0], expected[row, PREFILL - 1])
    for p in range(PREFILL, LENGTH):
        steps = [SequenceStep(p, 1, blocks) for blocks in tables]
        logits = model.forward_batch(ids[:, p], cache, BatchLayout.build(steps, block, "cpu", cache.pad_slot))
        close(logits, expected[:, p])


@torch.no_grad()
def test_longrope_takes_the_short_factors_when_the_context_is_within_the_original_length(tmp_path):
    """An instance whose context is at most the original length rotates as transformers does any sequence that short.
    One with a longer context takes the long factors for every position: a short prompt there is rotated as in a
    longer sequence (the first positions of transformers' long sequence), not as transformers rotates it alone."""
    reference = make_checkpoint("llama", SCALINGS["longrope"][1], tmp_path)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, LENGTH))
    short = load(tmp_path)
    short.prepare_positions(ORIGINAL)
    alone = reference(ids[:, :ORIGINAL]).logits
    close(short(ids[:, :ORIGINAL], short.make_cache(2, ORIGINAL), 0), alone)
    model = load(tmp_path)  # the model's own context, 128: past the original length
    ours = model(ids[:, :ORIGINAL], model.make_cache(2, ORIGINAL), 0)
    close(ours, reference(ids).logits[:, :ORIGINAL])
    assert (ours - alone).abs().amax() > 1e-2


@torch.no_grad()
def test_dynamic_scales_its_base_for_a_context_past_the_models_length(tmp_path):
    """Past max_position_embeddings transformers' dynamic NTK scales its base for the sequence's length; a model
    serving that many positions scales it alike (a served context is capped by the model's length, so there it
    rotates as the default does, as transformers does)."""
    reference = make_checkpoint("llama", SCALINGS["dynamic"][1], tmp_path, max_position_embeddings=ORIGINAL)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, LENGTH))
    model = load(tmp_path)
    model.prepare_positions(LENGTH)
    close(model(ids, model.make_cache(2, LENGTH), 0), reference(ids).logits)


def args_with(scaling: dict, **config: object) -> ModelArgs:
    return model_args({**TINY, "model_type": "llama", "rope_scaling": scaling, **config})


def test_a_scaling_without_its_original_length_takes_the_models_length():
    args = args_with({"type": "yarn", "factor": 4.0}, original_max_position_embeddings=16)
    assert args.rope_scaling == {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": TINY["max_position_embeddings"]}
    assert args_with({"rope_type": "default"}).rope_scaling is None


def test_transformers_5_rope_parameters_are_read():
    args = model_args({**TINY, "model_type": "llama", "rope_parameters": {
        "rope_type": "yarn", "factor": 2.0, "rope_theta": 5e5, "original_max_position_embeddings": 64}})
    assert args.rope_theta == 5e5 and args.rope_scaling is not None
    assert rope_frequencies(args, args.context_length)[1] == pytest.approx(0.1 * torch.log(torch.tensor(2.0)).item()
                                                                           + 1)


@pytest.mark.parametrize(("scaling", "message"), [
    ({"rope_type": "proportional", "factor": 2.0}, "'proportional' is not supported; supported: default, linear"),
    ({"rope_type": "longrope", "short_factor": SHORT}, "missing long_factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "missing low_freq_factor, high_freq_factor"),
    ({"rope_type": "longrope", "short_factor": SHORT[:3], "long_factor": LONG[:3]}, "has 3 values; head_dim 16 needs 8"),
    ({"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.3125}, "0.3125 of head_dim 16 rotates 5 dims"),
])
def test_an_unusable_rope_scaling_fails_at_build_saying_why(scaling, message):
    with pytest.raises(ModelLoadError, match=message):
        build_stage(args_with(scaling))
