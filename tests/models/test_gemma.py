"""Gemma 2 (`gemma2`) and Gemma 3's text model (`gemma3_text`) against Hugging Face transformers, through the real
safetensors loader and from GGUF files as llama.cpp writes them: logits with and without the cache at positions past
the sliding window and past the rotary scaling's original length, stage splits, the paged batching engine and the
compiled CPU decode step; and a sliding window on a Llama model's layers against transformers' Mistral, in the static
and the paged paths."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from ringlet.models import safetensors_loader
from ringlet.models.gemma import GemmaAttention, GemmaTransformer
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.llama import Attention, decode_attention
from ringlet.models.loader import LoadedStage
from ringlet.models.paged_cache import BatchLayout, SequenceStep
from ringlet.models.random_checkpoint import synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.batching import BatchGenerator
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.engine import TorchEngine
from tests.support.random_models import load_checkpoint_stage

WINDOW = 8  # every test sequence runs well past it
ORIGINAL = 32  # the yarn variant's original_max_position_embeddings
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "sliding_window": WINDOW, "query_pre_attn_scalar": 24, "bos_token_id": 1, "eos_token_id": 127,
        "pad_token_id": 0}
GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention"] * 2

CONFIGS = {
    # caps small enough that they bite on these activations
    "gemma2": lambda: transformers.Gemma2Config(**TINY, num_hidden_layers=4, attn_logit_softcapping=3.0,
                                                final_logit_softcapping=6.0),
    # yarn on the full layers only, the sliding ones at their own base; untied
    "gemma3-yarn": lambda: transformers.Gemma3TextConfig(
        **TINY, num_hidden_layers=6, layer_types=GEMMA3_LAYERS, tie_word_embeddings=False, rope_parameters={
            "full_attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                               "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    # Gemma 3 4B's shape of rotary settings (linear on the full layers), its config.json as transformers 4 wrote it
    # (`transformers4_config`)
    "gemma3-linear": lambda: transformers.Gemma3TextConfig(
        **TINY, num_hidden_layers=6, layer_types=GEMMA3_LAYERS, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}
HF_CLASSES = {"gemma2": transformers.Gemma2ForCausalLM, "gemma3_text": transformers.Gemma3ForCausalLM}


def transformers4_config(config: dict) -> dict:
    """A gemma3_text config.json as transformers 4 writes it: rope_theta, rope_scaling (the full layers') and
    rope_local_base_freq at the top level, the layers' kinds as a `sliding_window_pattern`."""
    config = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    return {**config, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 3,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0}}


def make_checkpoint(name: str, path: Path) -> transformers.PreTrainedModel:
    """A random model saved by transformers, its norms far from zero (Gemma scales by 1 + weight: a norm read as
    RMSNorm's weight, or left out, must show)."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = HF_CLASSES[config.model_type](config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
            elif "q_proj" in n or "k_proj" in n:  # attention logits of some size: the caps and the window bite
                p.mul_(8)
        model.model.embed_tokens.weight.mul_(3)
    model.save_pretrained(path, max_shard_size="100KB")
    if name == "gemma3-linear":
        written = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(transformers4_config(written)))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp(request.param)
    return make_checkpoint(request.param, path), path


def test_the_config_reads_as_transformers_reads_it(checkpoint):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    args = model_args(safetensors_loader.read_config(path))
    theirs = transformers.AutoConfig.from_pretrained(path)
    assert list(args.layer_types) == theirs.layer_types
    assert [args.attention_window(i) for i in range(args.num_hidden_layers)] == [
        WINDOW if kind == "sliding_attention" else None for kind in theirs.layer_types]
    assert args.context_length == TINY["max_position_embeddings"]  # the window bounds attention, not the context
    assert args.tie_word_embeddings == theirs.tie_word_embeddings
    if args.model_type == "gemma3_text":
        full, sliding = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
        assert args.rope_theta == full["rope_theta"] and args.sliding_rope_theta == sliding["rope_theta"]
        assert args.rope_scaling is not None and args.rope_scaling["rope_type"] == full["rope_type"]
        assert args.sliding_rope_scaling is None and sliding["rope_type"] == "default"
    else:
        assert (args.attn_logit_softcapping, args.final_logit_softcapping) == (3.0, 6.0)


@torch.no_grad()
def test_logits_match_transformers_with_and_without_cache_batch2(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    assert isinstance(model, GemmaTransformer)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 9))  # past the window and the original length
    cache = model.make_cache(batch_size=2, max_seq_len=96)
    ours = model(ids, cache, 0)
    torch.testing.assert_close(ours, reference(ids).logits, atol=1e-4, rtol=1e-4)
    theirs = reference(ids, use_cache=True)
    past, seq = theirs.cache, ids
    for _ in range(12):
        nxt = ours[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        ours = model(nxt, cache, seq.shape[1] - 1)
        step = reference(nxt, cache=past, use_cache=True)
        past = step.cache
        torch.testing.assert_close(ours[:, -1], step.logits[:, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours[:, -1], reference(seq).logits[:, -1], atol=1e-4, rtol=1e-4)
    assert len(set(seq[0, ids.shape[1]:].tolist())) > 1  # not one token repeated: the decode steps say something


@torch.no_grad()
def test_the_sliding_window_and_the_caps_change_the_logits(checkpoint):  # type: ignore[no-untyped-def]
    """The tests above would pass without the window (or the caps) if they changed nothing at these lengths."""
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 9))
    want = reference(ids).logits
    attentions = [block.self_attn for block in model.layers]
    windows = [attention.window for attention in attentions]
    assert WINDOW in windows and None in windows
    for attention in attentions:
        attention.window = None
    unwindowed = model(ids, model.make_cache(2, 64), 0)
    assert (unwindowed - want)[:, WINDOW + 1:].abs().max() > 1e-2
    assert torch.allclose(unwindowed[:, :WINDOW], want[:, :WINDOW], atol=1e-4, rtol=1e-4)  # the same inside it
    if model.args.final_logit_softcapping is not None:
        for attention, window in zip(attentions, windows):
            attention.window = window
        capped = model(ids, model.make_cache(2, 64), 0)
        assert capped.abs().max() < model.args.final_logit_softcapping
        assert isinstance(attentions[0], GemmaAttention) and not attentions[0].fused_kernels
        for attention in attentions:
            attention.softcap = None
            attention.fused_kernels = True
        assert (model(ids, model.make_cache(2, 64), 0) - want).abs().max() > 1e-2


@torch.no_grad()
def test_chunked_prefill_and_tensor_position_steps_give_transformers_logits(checkpoint):  # type: ignore[no-untyped-def]
    """Prompt chunks over a cached prefix, then one-token steps at a position tensor over a padded cache length (the
    compiled and CUDA-graphed decode step's form)."""
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 48))
    want = reference(ids).logits
    cache = model.make_cache(2, 64)
    parts = [model(ids[:, a:b], cache, a) for a, b in [(0, 5), (5, 19), (19, 40)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), want[:, :40], atol=1e-4, rtol=1e-4)
    model.prepare_positions(64)
    for position in range(40, 48):
        step = model(ids[:, position:position + 1], cache, torch.tensor([position]), last_logits_only=True, kv_len=64)
        torch.testing.assert_close(step[:, -1], want[:, position], atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_two_and_three_stages_give_the_whole_models_logits(checkpoint, cuts):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    whole = load_checkpoint_stage(path)
    bounds = [0, *cuts, whole.args.num_hidden_layers]
    stages = [load_checkpoint_stage(path, a, b) for a, b in itertools.pairwise(bounds)]
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 4))
    h: torch.Tensor = ids
    for stage in stages:
        h = stage(h, stage.make_cache(2, 64), 0)
    torch.testing.assert_close(h, whole(ids, whole.make_cache(2, 64), 0), atol=1e-5, rtol=1e-5)
    assert stages[0].embed_tokens is not None and stages[0].lm_head is None
    assert stages[-1].embed_tokens is None and stages[-1].lm_head is not None


def run_paged(model, ids: torch.Tensor, plan: list[list[tuple[int, int, int]]]) -> list[tuple[int, int, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Teacher-forced steps of the paged batching path over sequences `ids` [N, L]: each step is a list of (sequence,
    start, count). Returns (sequence, position, logits) of each step's last token of each sequence."""
    model.prepare_positions(64)
    block_size = 16
    cache = model.make_paged_cache(num_blocks=4 * ids.shape[0], block_size=block_size)
    out = []
    for step in plan:
        steps = [SequenceStep(start, count, [4 * n + b for b in range(4)]) for n, start, count in step]
        layout = BatchLayout.build(steps, block_size, "cpu", cache.pad_slot)
        tokens = torch.cat([ids[n, start:start + count] for n, start, count in step])
        logits = model.forward_batch(tokens, cache, layout)
        out += [(n, start + count - 1, row) for (n, start, count), row in zip(step, logits)]
    return out


# prompt chunks past the window (over a cached prefix too), a decode beside a chunk, a decode group of two
PAGED_PLAN = [[(0, 0, 16), (1, 0, 10)], [(0, 16, 14), (1, 10, 1)], [(0, 30, 1), (1, 11, 1)],
              [(0, 31, 1), (1, 12, 13)], [(0, 32, 1), (1, 25, 1)]]


@torch.no_grad()
def test_the_paged_path_gives_transformers_logits(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))
    want = reference(ids).logits
    for n, position, row in run_paged(model, ids, PAGED_PLAN):
        torch.testing.assert_close(row, want[n, position], atol=1e-4, rtol=1e-4)


def generated(chunks_of: dict[str, list[int]], engine: TorchBatchEngine, prompts: dict[str, list[int]],
              tokens: int) -> None:
    """Greedy runs of every prompt at once through the batching loop, in prompt chunks of 16 tokens."""
    generator = BatchGenerator(engine, max_step_tokens=16)
    for task_id, prompt in prompts.items():
        generator.submit(TextGenerationTask(task_id=task_id, prompt=" ".join(f"t{n}" for n in prompt),
                                            max_tokens=tokens, ignore_eos=True,
                                            sampling=SamplingParams(temperature=0)))
    while generator:
        for chunk in generator.step():
            if chunk.token_id is not None:
                chunks_of.setdefault(chunk.task_id, []).append(chunk.token_id)


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma2", "gemma3-yarn"])
def test_the_batch_engine_generates_transformers_greedy_tokens_two_at_once(name, tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint(name, tmp_path)
    model = load_checkpoint_stage(tmp_path)
    args = model.args
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchBatchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=1024, max_context=256))
    torch.manual_seed(2)
    prompts = {"a": torch.randint(2, 120, (37,)).tolist(), "b": torch.randint(2, 120, (21,)).tolist()}
    ours: dict[str, list[int]] = {}
    generated(ours, engine, prompts, tokens=14)
    for task_id, prompt in prompts.items():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        assert ours[task_id] == theirs, task_id
        assert len(set(theirs)) > 1


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma2", "gemma3-yarn"])
def test_the_compiled_cpu_decode_step_generates_transformers_greedy_tokens(name, tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint(name, tmp_path)
    model = load_checkpoint_stage(tmp_path)
    args = model.args
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchBatchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=1024, max_context=256,
                                                                       cpu_compile=True))
    engine.warmup()
    compiled = engine._compiled_decode
    assert compiled is not None
    calls = 0

    def counted(*inputs: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return compiled(*inputs)

    engine._compiled_decode = counted
    torch.manual_seed(2)
    prompts = {"a": torch.randint(2, 120, (37,)).tolist(), "b": torch.randint(2, 120, (21,)).tolist()}
    ours: dict[str, list[int]] = {}
    generated(ours, engine, prompts, tokens=14)
    assert calls >= 10  # the decode-only steps ran compiled
    for task_id, prompt in prompts.items():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        assert ours[task_id] == theirs, task_id


@torch.no_grad()
def test_bf16_embeddings_are_scaled_by_the_normalizer_in_bf16(tmp_path):  # type: ignore[no-untyped-def]
    """sqrt(72) is 8.485 in fp32 and 8.5 in bf16: transformers multiplies by the rounded one, and so must we."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**{**TINY, "hidden_size": 72, "head_dim": 18}, num_hidden_layers=2)
    reference = transformers.Gemma2ForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    args = model_args(safetensors_loader.read_config(tmp_path))
    model = build_stage(args, weights=safetensors_loader.lazy_weights(tmp_path, 0, 2, 2, True),
                        dtype=torch.bfloat16)
    reference = reference.to(torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    theirs = reference.model.embed_tokens(ids)
    assert torch.equal(model.embed(ids), theirs)
    assert not torch.equal(model.embed_tokens(ids) * (72**0.5), theirs)  # the unrounded factor differs
    torch.testing.assert_close(model.layers[0].input_layernorm(theirs),
                               reference.model.layers[0].input_layernorm(theirs))


@torch.no_grad()
def test_the_one_sequence_engine_generates_transformers_greedy_tokens(tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint("gemma2", tmp_path)
    model = load_checkpoint_stage(tmp_path)
    args = model.args
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchEngine(stage, torch.device("cpu"), EngineConfig(max_context=256))
    torch.manual_seed(3)
    prompt = torch.randint(2, 120, (30,)).tolist()
    task = TextGenerationTask(prompt=" ".join(f"t{n}" for n in prompt), max_tokens=12, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    ours = [chunk.token_id for chunk in engine.generate(task) if chunk.token_id is not None]
    theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_the_fused_cuda_steps_leave_gemma_and_windowed_layers_to_the_plain_path(checkpoint):  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from ringlet.worker.engines.torch.fused_decode import unsupported_reason

    _, path = checkpoint
    assert unsupported_reason(load_checkpoint_stage(path)) == (
        "Gemma's layers (scaled embeddings, norms by 1 + weight, GeGLU MLPs, soft-capped logits)")
    llama = build_stage(model_args({**MISTRAL, "model_type": "llama"}))
    assert unsupported_reason(llama) is None
    llama.layers[1].self_attn.window = WINDOW
    assert unsupported_reason(llama) == "sliding-window attention layers"


GEMMA3 = {**TINY, "model_type": "gemma3_text", "num_hidden_layers": 2}


def test_configs_it_cannot_run_are_refused_saying_why():
    with pytest.raises(ModelLoadError, match="GeGLU.*gelu_pytorch_tanh"):
        model_args({**GEMMA3, "hidden_activation": "silu"})
    with pytest.raises(ModelLoadError, match="layer_types"):
        model_args({**GEMMA3, "layer_types": ["sliding_attention"]})
    with pytest.raises(ModelLoadError, match="bidirectional attention"):
        model_args({**GEMMA3, "use_bidirectional_attention": True})
    with pytest.raises(ModelLoadError, match="only SiLU-gated MLPs"):  # the Llama family keeps its own
        model_args({**MISTRAL, "hidden_act": "gelu"})


def test_transformers_defaults_fill_a_sparse_config():
    """A config.json naming few keys reads with the defaults of transformers' config classes."""
    for kind, theirs in (("gemma2", transformers.Gemma2Config), ("gemma3_text", transformers.Gemma3TextConfig)):
        keys = {k: v for k, v in TINY.items() if k not in ("sliding_window", "query_pre_attn_scalar")}
        args = model_args({**keys, "model_type": kind, "num_hidden_layers": 12})
        config = theirs(**keys, num_hidden_layers=12)
        assert list(args.layer_types) == config.layer_types
        assert (args.sliding_window, args.query_pre_attn_scalar) == (config.sliding_window,
                                                                     config.query_pre_attn_scalar)
        assert (args.attn_logit_softcapping, args.final_logit_softcapping) == (config.attn_logit_softcapping,
                                                                               config.final_logit_softcapping)
        assert args.tie_word_embeddings and config.tie_word_embeddings
        if kind == "gemma3_text":
            assert args.rope_theta == config.rope_parameters["full_attention"]["rope_theta"]
            assert args.sliding_rope_theta == config.rope_parameters["sliding_attention"]["rope_theta"]


def test_the_cuda_decode_steps_attention_takes_the_window_and_the_scale():
    """`decode_attention` (the CUDA-graphed static step's; here on CPU tensors) under a window's mask and a scale of
    its own, against SDPA over the keys the window keeps."""
    torch.manual_seed(4)
    attention = Attention(model_args({**MISTRAL, "query_pre_attn_scalar": 24}))
    attention.window = WINDOW
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    position = torch.tensor([20])
    mask = attention.visible(position, 1, 32, q.device)
    assert mask.sum() == WINDOW and mask[0, 20] and not mask[0, 20 - WINDOW] and not mask[0, 21]
    kept = slice(20 - WINDOW + 1, 21)
    want = F.scaled_dot_product_attention(q, k[:, :, kept], v[:, :, kept], scale=24**-0.5, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask, attention.scale), want)


# a Llama-family model whose layers attend over a sliding window, against transformers' Mistral, which applies one
MISTRAL = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def windowed_llama(tmp_path_factory):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mistral")
    config = transformers.MistralConfig(**{k: v for k, v in MISTRAL.items() if k != "model_type"},
                                        sliding_window=WINDOW)
    reference = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():
        reference.model.embed_tokens.weight.mul_(20)
    reference.save_pretrained(path)
    model = load_checkpoint_stage(path)
    for block in model.layers:  # ringlet's mistral serves at most the window; here each layer applies it
        block.self_attn.window = WINDOW
    return reference, model


@torch.no_grad()
def test_a_windowed_llama_gives_transformers_logits_in_the_static_and_paged_paths(windowed_llama):  # type: ignore[no-untyped-def]
    reference, model = windowed_llama
    ids = torch.randint(0, MISTRAL["vocab_size"], (2, 40))
    want = reference(ids).logits
    cache = model.make_cache(2, 64)
    ours = torch.cat([model(ids[:, a:b], cache, a) for a, b in [(0, 20), (20, 33), (33, 34), (34, 35)]], dim=1)
    torch.testing.assert_close(ours, want[:, :35], atol=1e-4, rtol=1e-4)
    model.prepare_positions(64)
    for position in range(35, 40):
        step = model(ids[:, position:position + 1], cache, torch.tensor([position]), last_logits_only=True, kv_len=64)
        torch.testing.assert_close(step[:, -1], want[:, position], atol=1e-4, rtol=1e-4)
    for n, position, row in run_paged(model, ids, PAGED_PLAN):
        torch.testing.assert_close(row, want[n, position], atol=1e-4, rtol=1e-4)
    unwindowed = transformers.MistralForCausalLM(transformers.MistralConfig(
        **{k: v for k, v in MISTRAL.items() if k != "model_type"}, sliding_window=None)).eval()
    unwindowed.load_state_dict(reference.state_dict())
    assert (unwindowed(ids).logits - want)[:, WINDOW + 1:].abs().max() > 1e-2  # the window matters at these lengths


# GGUF files as llama.cpp's converter writes Gemma: no key holds the attention scale (llama.cpp takes head_dim's but
# for the 27B models), the sliding layers' pattern is llama.cpp's own (2, or 6 for Gemma 3)
GGUF_CONFIGS = {
    "gemma2": lambda: transformers.Gemma2Config(**{**TINY, "query_pre_attn_scalar": 16}, num_hidden_layers=4,
                                                attn_logit_softcapping=3.0, final_logit_softcapping=6.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**TINY, "query_pre_attn_scalar": 16}, num_hidden_layers=7, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def write_gemma_gguf(reference: transformers.PreTrainedModel, path: Path) -> None:
    """The checkpoint as llama.cpp's converter (Gemma2Model, Gemma3Model) writes it: every norm's scale stored as
    1 + weight, the norm before the MLP as `ffn_norm`, the one after the attention as `post_attention_norm`; the
    window, the caps and a linear rope scaling (the full layers') as keys; tied embeddings."""
    config = reference.config
    arch = "gemma2" if config.model_type == "gemma2" else "gemma3"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    else:
        full = config.rope_parameters["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    writer.add_uint32("tokenizer.ggml.eos_token_id", config.eos_token_id)
    state = {name: tensor.numpy().astype(np.float32) for name, tensor in reference.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"] + 1)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    if arch == "gemma3":
        names |= {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for i in range(config.num_hidden_layers):
        for hf, name in names.items():
            values = state[f"model.layers.{i}.{hf}.weight"]
            writer.add_tensor(f"blk.{i}.{name}.weight", values + 1 if "norm" in name else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(GGUF_CONFIGS))
def test_a_gemma_gguf_file_gives_transformers_logits(arch, tmp_path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = GGUF_CONFIGS[arch]()
    reference = HF_CLASSES[config.model_type](config).eval()
    for n, p in reference.named_parameters():
        if "norm" in n:
            p.normal_(0.0, 0.3)
        elif "q_proj" in n or "k_proj" in n:
            p.mul_(8)
    write_gemma_gguf(reference, tmp_path / f"{arch}.gguf")
    file = GGUFModel.open(tmp_path / f"{arch}.gguf")
    args = model_args(file.config)
    assert list(args.layer_types) == config.layer_types and args.sliding_window == WINDOW
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 9))
    theirs = reference(ids).logits
    layers = args.num_hidden_layers
    for bounds in ([0, layers], [0, 3, layers]):  # one stage, then two
        h: torch.Tensor = ids
        for start, end in itertools.pairwise(bounds):
            stage = build_stage(args, start, end, weights=file.lazy_state_dict(start, end))
            h = stage(h, stage.make_cache(2, 64), 0)
        torch.testing.assert_close(h, theirs, atol=1e-4, rtol=1e-4)
