"""Mixture-of-experts architectures (qwen3_moe, mixtral) against Hugging Face transformers, through the real
safetensors loader: logits, routing, pipeline stages and the batching engine."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import transformers

from ringlet.models import safetensors_loader
from ringlet.models.experts import Experts, Int4Experts, Int8Experts
from ringlet.models.loader import LoadedStage
from ringlet.models.moe import SparseMoE, routes_in_grouped_products
from ringlet.models.quant import quantize_experts_int4, quantize_int8, quantize_layer_int4
from ringlet.models.quant_format import GroupQuantized
from ringlet.models.random_checkpoint import synthetic_tokenizer
from ringlet.models.registry import model_args
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.engine import TorchEngine
from tests.support.random_models import load_checkpoint_stage

TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "num_experts_per_tok": 2}
LAYERS = 4

CONFIGS = {
    # layer 1 dense (mlp_only_layers), the chosen experts' weights renormalised
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **TINY, num_hidden_layers=LAYERS, num_experts=4, moe_intermediate_size=32, intermediate_size=96,
        head_dim=24, mlp_only_layers=[1], norm_topk_prob=True),
    # every second layer sparse, the chosen experts' softmax weights as they are
    "qwen3_moe-sparse-step": lambda: transformers.Qwen3MoeConfig(
        **TINY, num_hidden_layers=LAYERS, num_experts=4, moe_intermediate_size=32, intermediate_size=96,
        decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True),
    "mixtral": lambda: transformers.MixtralConfig(
        **TINY, num_hidden_layers=LAYERS, num_local_experts=4, intermediate_size=48),
}
HF_CLASSES = {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM}


def make_checkpoint(name: str, path: Path, tie_experts: tuple[int, int] | None = None) -> transformers.PreTrainedModel:
    """A random model saved by transformers. Norms are not all ones, routers are large enough that experts' weights
    differ, and the embedding and head are peaked so that greedy choices are no near-ties. With `tie_experts` (a, b),
    every router logit of expert a equals that of expert b, and both compete for the last of the top-k places."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = HF_CLASSES[config.model_type](config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
            elif n.endswith("gate.weight"):
                p.mul_(50)
            elif "embed_tokens" in n or "lm_head" in n:
                p.mul_(20)
        if tie_experts is not None:
            a, b = tie_experts
            first = ({0, 1, 2, 3} - {a, b}).pop()
            last = ({0, 1, 2, 3} - {a, b, first}).pop()
            for layer in (layer for layer in model.model.layers if hasattr(layer.mlp, "experts")):
                router = _router(layer).weight
                direction = router[a].clone()
                # logits: first 2v.x, a = b = v.x, last -v.x: the tie always decides the second place
                router[a], router[b], router[first], router[last] = direction, direction, 2 * direction, -direction
    model.save_pretrained(path, max_shard_size="100KB")
    return model


def _router(layer):  # type: ignore[no-untyped-def]
    return layer.mlp.gate


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp(request.param)
    return make_checkpoint(request.param, path), path


def test_checkpoint_names_each_expert_and_is_read_into_stacked_experts(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    names = safetensors_loader.weight_map(path)
    assert any(".experts.3." in name for name in names)  # the layout published checkpoints have
    model = load_checkpoint_stage(path)
    sparse = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoE)]
    assert sparse == [i for i, layer in enumerate(reference.model.layers) if hasattr(layer.mlp, "experts")]
    args = model.args
    experts = model.layers[sparse[0]].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * args.moe_intermediate_size, 64)
    assert experts.down_proj.shape == (4, 64, args.moe_intermediate_size)
    # every expert's weights counted (not the q/k norms': no architecture counts those)
    counted = sum(p.numel() for n, p in reference.named_parameters() if "q_norm" not in n and "k_norm" not in n)
    assert args.num_parameters == counted


@torch.no_grad()
def test_logits_match_transformers_with_and_without_cache_batch2(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    cache = model.make_cache(batch_size=2, max_seq_len=64)
    ours = model(ids, cache, 0)
    torch.testing.assert_close(ours, reference(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)
    # decode steps through our cache and through transformers' own, each also against a full recompute
    theirs = reference(ids, use_cache=True)
    past, seq = theirs.past_key_values, ids
    for _ in range(12):
        nxt = ours[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        ours = model(nxt, cache, seq.shape[1] - 1)
        step = reference(nxt, past_key_values=past, use_cache=True)
        past = step.past_key_values
        torch.testing.assert_close(ours[:, -1], step.logits[:, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours[:, -1], reference(seq, use_cache=False).logits[:, -1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_pipeline_stages_equal_whole_model(checkpoint, cuts):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    bounds = [0, *cuts, LAYERS]
    stages = [load_checkpoint_stage(path, a, b) for a, b in itertools.pairwise(bounds)]
    whole = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    h: torch.Tensor = ids
    for stage in stages:
        h = stage(h, stage.make_cache(2, 32), 0)
    torch.testing.assert_close(h, whole(ids, whole.make_cache(2, 32), 0), atol=1e-5, rtol=1e-5)
    for stage, (a, b) in zip(stages, itertools.pairwise(bounds)):  # each stage holds its own layers' experts
        held = [isinstance(layer.mlp, SparseMoE) for layer in stage.layers]
        assert held == [whole.args.is_moe_layer(i) for i in range(a, b)]


@torch.no_grad()
def test_router_picks_and_weighs_as_transformers(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    layer = next(i for i in range(LAYERS) if model.args.is_moe_layer(i))
    tokens = torch.randn(64, 64)
    _, their_weights, their_experts = _router(reference.model.layers[layer])(tokens)
    our_experts, our_weights = model.layers[layer].mlp.route(tokens)
    assert torch.equal(our_experts, their_experts)
    torch.testing.assert_close(our_weights, their_weights.float(), atol=1e-6, rtol=1e-6)
    if model.args.norm_topk_prob:
        torch.testing.assert_close(our_weights.sum(-1), torch.ones(64))
    else:
        assert (our_weights.sum(-1) < 1 - 1e-3).any()  # the weights of the chosen experts as they are


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("tied", [(1, 2), (2, 1), (0, 3)])
def test_tied_router_logits_pick_transformers_expert(name, tied, tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint(name, tmp_path, tie_experts=tied)
    model = load_checkpoint_stage(tmp_path)
    hidden = reference.model.embed_tokens(torch.randint(0, TINY["vocab_size"], (2, 7)))
    tokens = reference.model.layers[0].post_attention_layernorm(hidden).view(-1, 64)
    logits, _, their_experts = _router(reference.model.layers[0])(tokens)
    a, b = tied
    assert torch.equal(logits[:, a], logits[:, b])  # a real tie, for the second place of every token
    assert ((their_experts[:, 1] == a) | (their_experts[:, 1] == b)).all()
    our_experts, _ = model.layers[0].mlp.route(tokens)
    assert torch.equal(our_experts, their_experts)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    torch.testing.assert_close(model(ids, model.make_cache(2, 16), 0), reference(ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize(("hidden", "width"), [(16, 8), (15, 6)])  # rows of 16-byte multiples (grouped mm), others
def test_experts_run_grouped_with_every_expert_or_none_routed_to(hidden, width):  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    experts = Experts(4, hidden, width)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    counts = torch.tensor([3, 0, 5, 0])
    rows = torch.randn(8, hidden)

    def one_by_one(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        out = []
        for expert, (first, end) in zip((0, 2), ((0, 3), (3, 8))):
            gate, up = (rows[first:end] @ gate_up[expert].T).chunk(2, dim=-1)
            out.append((torch.nn.functional.silu(gate) * up) @ down[expert].T)
        return torch.cat(out)

    expected = one_by_one(experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(experts(rows, counts), expected, atol=1e-4, rtol=1e-4)
    quantized = Int8Experts(experts, torch.float32)
    assert quantized.gate_up_proj.dtype == torch.int8 and quantized.gate_up_proj.shape == (4, 2 * width, hidden)
    rounded = one_by_one(quantized.gate_up_proj.float() * quantized.gate_up_scales[..., None],
                         quantized.down_proj.float() * quantized.down_scales[..., None])
    torch.testing.assert_close(quantized(rows, counts), rounded, atol=1e-4, rtol=1e-4)
    assert torch.linalg.norm(rounded - expected) < 0.02 * torch.linalg.norm(expected)


@torch.no_grad()
def test_int4_experts_run_each_experts_rounded_weights():
    """Each expert's projections rounded to 4 bits in groups of 32 (as `GroupQuantized.round` rounds a linear), run
    by the int4 kernel on that expert's rows; a width that is not whole groups keeps int8 rows."""
    torch.manual_seed(0)
    hidden, width = 64, 32
    holder = torch.nn.Module()
    holder.experts = Experts(4, hidden, width)
    experts = holder.experts
    counts = torch.tensor([3, 0, 5, 2])
    rows = torch.randn(10, hidden)
    quantize_experts_int4(holder, torch.float32)
    assert isinstance(holder.experts, Int4Experts)
    got, want, first = holder.experts(rows, counts), [], 0
    for e, count in enumerate(counts.tolist()):
        gate_up = GroupQuantized.round(experts.gate_up_proj[e].detach()).dequantize()
        down = GroupQuantized.round(experts.down_proj[e].detach()).dequantize()
        gate, up = (rows[first:first + count] @ gate_up.T).chunk(2, dim=-1)
        want.append((torch.nn.functional.silu(gate) * up) @ down.T)
        first += count
    torch.testing.assert_close(got, torch.cat(want), atol=1e-4, rtol=1e-4)
    holder.experts = Experts(2, hidden, 48)  # 48 inputs of the down projection: not whole groups of 32
    quantize_experts_int4(holder, torch.float32)
    assert isinstance(holder.experts, Int8Experts)


@torch.no_grad()
@pytest.mark.parametrize("how", ["int8", "int4"])
def test_quantised_stage_keeps_router_and_quantises_experts(how, tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint("qwen3_moe", tmp_path)
    model = load_checkpoint_stage(tmp_path)
    if how == "int8":
        quantize_int8(model, torch.float32)
    else:
        for i, layer in enumerate(model.layers):
            quantize_layer_int4(layer, i, torch.float32, {}, file_groups=False)
    moe = model.layers[0].mlp
    assert isinstance(moe.experts, Int8Experts if how == "int8" else Int4Experts)
    assert moe.router.dtype == torch.float32
    assert type(model.layers[1].mlp.gate_up_proj).__name__ in ("Int8Linear", "Int4Linear")  # the dense layer's
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    ours, theirs = model(ids, model.make_cache(2, 16), 0), reference(ids).logits
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree > 0.8, f"quantised greedy choices agree with fp32 on {agree:.0%} of positions"


def test_placement_counts_every_experts_bytes(checkpoint):  # type: ignore[no-untyped-def]
    from ringlet.models.catalog import WEIGHT_ONLY_INT8, XPU_INT4, card_from_args

    reference, path = checkpoint
    args = model_args(safetensors_loader.read_config(path))
    card = card_from_args("tiny-moe", args)
    tensors = sum(p.numel() for p in reference.parameters())
    assert card.num_parameters == pytest.approx(tensors, rel=0.02)  # layers averaged where some are dense
    whole = card.stage_bytes(0, LAYERS, "float32")
    assert whole == pytest.approx(4 * tensors, rel=0.02)
    experts_of_layer = 4 * 3 * 64 * args.moe_intermediate_size
    assert card.stage_bytes(1, 2, "float32") > 4 * experts_of_layer * 0.5  # a middle stage: its layer's experts
    sparse = sum(args.is_moe_layer(n) for n in range(LAYERS))
    assert card.layer_expert_parameters * LAYERS == pytest.approx(sparse * experts_of_layer, abs=LAYERS)
    # int4 experts: half a byte a weight and a bf16 scale and offset per group of 32 (`Int4Experts`); int8 experts
    # (the CPU's default format): a byte a weight
    int4, int8 = card.stage_bytes(0, LAYERS, XPU_INT4), card.stage_bytes(0, LAYERS, WEIGHT_ONLY_INT8)
    assert int4 > 0.625 * sparse * experts_of_layer and int8 > sparse * experts_of_layer
    assert int8 - int4 > 0.375 * sparse * experts_of_layer  # the experts' part of the difference; the rest is the
    # other linears' (0.625 bytes a weight against a byte)


@torch.no_grad()
@pytest.mark.parametrize("engine_class", [TorchBatchEngine, TorchEngine])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_engine_greedy_tokens_equal_transformers_generate(name, engine_class, tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint(name, tmp_path)
    model = load_checkpoint_stage(tmp_path)
    args = model.args
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = engine_class(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=1024, max_context=256))
    engine.warmup()  # compiles no routed fp32 step (cpu_compile is on; grouped products compile in bf16), generates
    if isinstance(engine, TorchBatchEngine):
        assert engine._compiled_decode is None and engine.paged_decode is None
    else:
        assert engine.decoder is None
    prompt = [5, 17, 3, 99, 42, 8]
    task = TextGenerationTask(prompt=" ".join(f"t{n}" for n in prompt), max_tokens=16, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    ours = [chunk.token_id for chunk in engine.generate(task) if chunk.token_id is not None]
    theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    assert len(set(ours)) > 1  # not one token repeated: the comparison says something


@torch.no_grad()
def test_a_compiled_bf16_step_gives_the_eager_steps_tokens(tmp_path):  # type: ignore[no-untyped-def]
    """bf16 experts run as grouped products compile into the CPU decode step; its greedy tokens are the eager step's.
    Per-expert products (int8 experts: each expert's row count is read on the host) are never compiled."""
    make_checkpoint("qwen3_moe", tmp_path)
    engines = []
    for compiled in (True, False):
        model = load_checkpoint_stage(tmp_path).to(torch.bfloat16)
        assert routes_in_grouped_products(model)
        stage = LoadedStage(model.args, model, synthetic_tokenizer(model.args.vocab_size), 0, LAYERS)
        engine = TorchBatchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=1024, max_context=256,
                                                                           cpu_compile=compiled))
        engine.warmup()
        assert (engine._compiled_decode is not None) == compiled
        engines.append(engine)
    task = TextGenerationTask(prompt="t5 t17 t3 t99 t42 t8", max_tokens=16, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    compiled_tokens, eager_tokens = ([c.token_id for c in engine.generate(task) if c.token_id is not None]
                                     for engine in engines)
    assert compiled_tokens == eager_tokens and len(set(compiled_tokens)) > 1
    quantize_int8(model, torch.bfloat16)
    assert not routes_in_grouped_products(model)
    assert not routes_in_grouped_products(load_checkpoint_stage(tmp_path))  # fp32 experts
