"""GPT-OSS (gpt_oss) against Hugging Face transformers, through the real safetensors loader: logits with and without
cache past the sliding window and yarn's original length, pipeline stages, routing, MXFP4 experts read packed from a
checkpoint, and the batching engine."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import transformers
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ringlet.models import safetensors_loader
from ringlet.models.catalog import card_from_config
from ringlet.models.gpt_oss import GptOssExperts, Mxfp4Experts, dequantize_mxfp4
from ringlet.models.hf_quant import quant_scheme
from ringlet.models.loader import LoadedStage
from ringlet.models.random_checkpoint import synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.engine import TorchEngine
from tests.support.gpt_oss import (
    CONFIG,
    ENGINE_PROMPTS,
    EXPERTS,
    HIDDEN,
    LAYERS,
    PROMPT,
    VOCAB,
    WIDTH,
    WINDOW,
    generate_two_at_once,
    reference_greedy,
    reference_model,
    write_mxfp4_checkpoint,
)
from tests.support.random_models import load_checkpoint_stage


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.GptOssForCausalLM, Path]:
    path = tmp_path_factory.mktemp("gpt_oss")
    model = reference_model()
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def mxfp4_checkpoint(checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    _, float_dir = checkpoint
    reference = reference_model()
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4") / "model"
    write_mxfp4_checkpoint(reference, float_dir, path)
    return reference, path


def compare_with_cache(model, reference, ids: torch.Tensor, atol: float) -> None:  # type: ignore[no-untyped-def]
    """Logits of a prefill in two chunks, then of decode steps, each against transformers' without cache; the decode
    steps also against transformers' own cache."""
    cache = model.make_cache(batch_size=ids.shape[0], max_seq_len=96)
    full = reference(ids, use_cache=False).logits
    torch.testing.assert_close(model(ids, model.make_cache(ids.shape[0], 96), 0), full, atol=atol, rtol=atol)
    split = 30  # a later chunk attends the cached prefix too, through the window
    ours = torch.cat((model(ids[:, :split], cache, 0), model(ids[:, split:], cache, split)), dim=1)
    torch.testing.assert_close(ours, full, atol=atol, rtol=atol)
    past, seq = reference(ids, use_cache=True).cache, ids
    for _ in range(6):
        nxt = ours[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        ours = model(nxt, cache, seq.shape[1] - 1)
        step = reference(nxt, cache=past, use_cache=True)
        past = step.cache
        torch.testing.assert_close(ours[:, -1], step.logits[:, -1], atol=atol, rtol=atol)
        torch.testing.assert_close(ours[:, -1], reference(seq, use_cache=False).logits[:, -1], atol=atol, rtol=atol)


def test_checkpoint_is_read_into_float_experts_with_sliding_and_full_layers(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    assert [layer.self_attn.window for layer in model.layers] == [WINDOW, None, WINDOW, None]
    experts = model.layers[0].mlp.experts
    assert isinstance(experts, GptOssExperts)
    assert experts.gate_up_proj.shape == (EXPERTS, 2 * WIDTH, HIDDEN)
    assert experts.down_proj.shape == (EXPERTS, HIDDEN, WIDTH)
    # placement counts every expert's weights and biases, and the router's
    mlp = sum(p.numel() for p in reference.model.layers[0].mlp.parameters())
    assert model.args.mlp_parameters(0) == mlp
    assert model.args.context_length == CONFIG["max_position_embeddings"]  # a real window caps no context


@torch.no_grad()
def test_logits_match_transformers_with_and_without_cache_batch2(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    torch.manual_seed(1)
    compare_with_cache(load_checkpoint_stage(path), reference, torch.randint(0, VOCAB, (2, PROMPT)), atol=1e-4)


@torch.no_grad()
def test_long_prompts_attend_a_chunk_of_queries_at_a_time(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    for layer in model.layers:
        layer.self_attn.scores_per_chunk = 2 * 4 * PROMPT * 5  # 5 queries of batch 2 over the whole prompt
    ids = torch.randint(0, VOCAB, (2, PROMPT))
    torch.testing.assert_close(model(ids, model.make_cache(2, 64), 0), reference(ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sinks_take_attention_weight(checkpoint):  # type: ignore[no-untyped-def]
    """Without its sinks the model's logits are not transformers': the comparisons above test them."""
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    for layer in model.layers:
        layer.self_attn.sinks.fill_(float("-inf"))  # a sink of no weight
    ids = torch.randint(0, VOCAB, (2, 12))
    assert (model(ids, model.make_cache(2, 16), 0) - reference(ids).logits).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_pipeline_stages_equal_whole_model(checkpoint, cuts):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    bounds = [0, *cuts, LAYERS]
    stages = [load_checkpoint_stage(path, a, b) for a, b in itertools.pairwise(bounds)]
    whole = load_checkpoint_stage(path)
    ids = torch.randint(0, VOCAB, (2, 20))
    h: torch.Tensor = ids
    for stage in stages:
        h = stage(h, stage.make_cache(2, 32), 0)
    torch.testing.assert_close(h, whole(ids, whole.make_cache(2, 32), 0), atol=1e-5, rtol=1e-5)
    for stage, (a, b) in zip(stages, itertools.pairwise(bounds)):  # each stage holds its own layers, windows and all
        assert [layer.self_attn.window for layer in stage.layers] == [WINDOW if n % 2 == 0 else None
                                                                      for n in range(a, b)]


@torch.no_grad()
def test_router_picks_and_weighs_as_transformers(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    tokens = torch.randn(64, HIDDEN)
    for layer in range(LAYERS):
        _, their_weights, their_experts = reference.model.layers[layer].mlp.router(tokens)
        our_experts, our_weights = model.layers[layer].mlp.route(tokens)
        assert torch.equal(our_experts, their_experts)
        torch.testing.assert_close(our_weights, their_weights, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(our_weights.sum(-1), torch.ones(64))  # a softmax over the chosen logits


@torch.no_grad()
@pytest.mark.parametrize("hidden", [64, 60])  # rows of 16-byte multiples (torch._grouped_mm on CPUs), others
def test_float_experts_run_grouped_with_every_expert_or_none_routed_to(hidden):  # type: ignore[no-untyped-def]
    args = model_args({"model_type": "gpt_oss", **CONFIG, "hidden_size": hidden})
    torch.manual_seed(3)
    experts = GptOssExperts(args)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    counts = torch.tensor([3, 0, 5, 0])
    rows = torch.randn(8, hidden)
    expected = []
    for expert, (first, end) in zip((0, 2), ((0, 3), (3, 8))):
        inner = rows[first:end] @ experts.gate_up_proj[expert].T + experts.gate_up_proj_bias[expert]
        gate, up = inner[:, ::2].clamp(max=7.0), inner[:, 1::2].clamp(-7.0, 7.0)
        expected.append(((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ experts.down_proj[expert].T
                        + experts.down_proj_bias[expert])
    torch.testing.assert_close(experts(rows, counts), torch.cat(expected), atol=1e-4, rtol=1e-4)


def test_mxfp4_dequantises_as_transformers():  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=generator)  # every code
    scales = torch.randint(100, 140, (3, 5, 4), dtype=torch.uint8, generator=generator)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # [E, out, in]
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), theirs)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16), theirs.bfloat16())


@torch.no_grad()
def test_mxfp4_checkpoint_gives_its_dequantised_logits_and_stays_packed(mxfp4_checkpoint):  # type: ignore[no-untyped-def]
    reference, path = mxfp4_checkpoint
    model = load_checkpoint_stage(path)
    experts = model.layers[0].mlp.experts
    assert isinstance(experts, Mxfp4Experts)
    assert experts.gate_up_proj_blocks.dtype == torch.uint8
    assert experts.gate_up_proj_blocks.shape == (EXPERTS, 2 * WIDTH, HIDDEN // 32, 16)
    weights = EXPERTS * 3 * HIDDEN * WIDTH
    packed = sum(b.numel() for b in experts.buffers())
    assert packed * 8 / weights == 4.25  # codes and scales, and no float copy of them
    assert not any(p.numel() >= weights // 2 for p in experts.parameters())
    torch.manual_seed(2)
    compare_with_cache(model, reference, torch.randint(0, VOCAB, (2, PROMPT)), atol=1e-4)


def test_mxfp4_is_read_for_gpt_oss_only(mxfp4_checkpoint):  # type: ignore[no-untyped-def]
    _, path = mxfp4_checkpoint
    config = safetensors_loader.read_config(path)
    scheme = quant_scheme(config)
    assert scheme is not None and scheme.method == "mxfp4"
    assert model_args(config).mxfp4_experts
    llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 128, "quantization_config": {"quant_method": "mxfp4"}}
    with pytest.raises(ModelLoadError, match="mxfp4.*gpt_oss's experts only.*'llama'"):
        quant_scheme(llama)


def test_catalog_holds_mxfp4_experts_packed(mxfp4_checkpoint, checkpoint):  # type: ignore[no-untyped-def]
    _, path = mxfp4_checkpoint
    _, float_path = checkpoint
    packed = card_from_config("tiny/gpt-oss-mxfp4", safetensors_loader.read_config(path))
    plain = card_from_config("tiny/gpt-oss", safetensors_loader.read_config(float_path))
    experts = LAYERS * EXPERTS * 3 * HIDDEN * WIDTH
    assert packed.layer_expert_parameters * LAYERS == experts
    for dtype, size in (("float32", 4), ("bfloat16", 2)):  # the codes whatever the dtype the rest is in
        saved = plain.stage_bytes(0, LAYERS, dtype) - packed.stage_bytes(0, LAYERS, dtype)
        assert saved == pytest.approx(experts * (size - 4.25 / 8), abs=LAYERS)
        assert packed.weight_bytes(dtype) == packed.stage_bytes(0, LAYERS, dtype)
    model = load_checkpoint_stage(path)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert packed.stage_bytes(0, LAYERS, "float32") == pytest.approx(held, rel=0.02)


@torch.no_grad()
@pytest.mark.parametrize("mxfp4", [False, True], ids=["float", "mxfp4"])
def test_batch_engine_generates_transformers_greedy_tokens_for_two_sequences(mxfp4, checkpoint, mxfp4_checkpoint):  # type: ignore[no-untyped-def]
    reference, path = mxfp4_checkpoint if mxfp4 else checkpoint
    model = load_checkpoint_stage(path)
    args = model.args
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchBatchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=1024, max_context=128))
    engine.warmup()
    assert engine._compiled_decode is None and engine.paged_decode is None
    for ours, prompt in zip(generate_two_at_once(engine, 12), ENGINE_PROMPTS, strict=True):
        theirs = reference_greedy(reference, prompt, 12)
        assert ours == theirs
        assert len(set(theirs)) > 1  # not one token repeated: the comparison says something


@torch.no_grad()
def test_static_engine_generates_transformers_greedy_tokens(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    args = model.args
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=1024, max_context=128))
    engine.warmup()
    assert engine.decoder is None  # no compiled step for a mixture of experts
    prompt = list(range(20, 40))
    task = TextGenerationTask(prompt=" ".join(f"t{n}" for n in prompt), max_tokens=12, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    ours = [chunk.token_id for chunk in engine.generate(task) if chunk.token_id is not None]
    assert ours == reference_greedy(reference, prompt, 12)


@pytest.mark.parametrize("layer_types", [CONFIG["layer_types"], ["full_attention"] * LAYERS])
def test_fused_cuda_steps_refuse_sinks(layer_types):  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from ringlet.worker.engines.torch.fused_decode import unsupported_reason

    model = build_stage(model_args({"model_type": "gpt_oss", **CONFIG, "layer_types": layer_types}))
    for experts in (False, True):  # the fused decode step, and the paged one that runs float experts
        assert unsupported_reason(model, experts=experts) == "an attention of its own (gpt_oss's sinks)"
