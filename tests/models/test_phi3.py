"""Phi-3 (`phi3`: Phi-3, Phi-3.5, Phi-4, Phi-4-mini) against Hugging Face transformers, through the real safetensors
loader: its fused qkv_proj and gate_up_proj tensors, longrope scaling past the original length, a partial rotary
embedding, tied and untied embeddings, stage splits, and greedy generation by the batch engine."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from ringlet.models import safetensors_loader
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.loader import LoadedStage
from ringlet.models.quant import Int4Linear, quantize_layer_int4
from ringlet.models.random_checkpoint import synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ModelLoadError
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from tests.support.greedy import greedy_task, run_greedy
from tests.support.random_models import load_checkpoint_stage
from tests.support.tiny_gguf import encode, raw_dtype
from tests.support.tiny_model import words

ORIGINAL = 32  # the longrope variants' original_max_position_embeddings: the tests run sequences past it
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 127, "pad_token_id": None}


def _factors(count: int, low: float, high: float) -> list[float]:
    return torch.linspace(low, high, count).tolist()


def _longrope(rotary_dim: int) -> dict:
    return {"rope_type": "longrope", "short_factor": _factors(rotary_dim // 2, 1.0, 1.6),
            "long_factor": _factors(rotary_dim // 2, 1.0, 9.0)}


CONFIGS = {
    # Phi-3.5-mini's shape of config: longrope, untied, a sliding window past the context
    "longrope": lambda: transformers.Phi3Config(**TINY, rope_scaling=_longrope(16), sliding_window=512,
                                                original_max_position_embeddings=ORIGINAL, tie_word_embeddings=False),
    # Phi-3-mini-4k's / Phi-4's: no scaling
    "plain": lambda: transformers.Phi3Config(**TINY, rope_theta=50000.0, tie_word_embeddings=False),
    # Phi-4-mini's: longrope on the leading 3/4 of each head, tied embeddings
    "partial-rotary": lambda: transformers.Phi3Config(**TINY, rope_scaling=_longrope(12), partial_rotary_factor=0.75,
                                                      original_max_position_embeddings=ORIGINAL,
                                                      tie_word_embeddings=True),
}


def make_checkpoint(name: str, path: Path) -> transformers.Phi3ForCausalLM:
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(CONFIGS[name]()).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # not all ones: a norm left out must show
                p.normal_(1.0, 0.1)
        model.model.embed_tokens.weight.mul_(20)  # activations of a realistic size and peaked logits: greedy picks
        if not model.config.tie_word_embeddings:  # are no near-ties
            model.lm_head.weight.mul_(20)
    model.save_pretrained(path, max_shard_size="100KB")  # several files and an index
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp(request.param)
    return make_checkpoint(request.param, path), path


def test_the_checkpoint_holds_fused_tensors_and_the_stage_reads_them(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    names = set(safetensors_loader.weight_map(path))
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any("q_proj" in n or "gate_proj." in n for n in names)
    model = load_checkpoint_stage(path)
    layer = reference.model.layers[2]
    torch.testing.assert_close(model.layers[2].self_attn.qkv_proj.weight, layer.self_attn.qkv_proj.weight)
    torch.testing.assert_close(model.layers[2].mlp.gate_up_proj.weight, layer.mlp.gate_up_proj.weight)


@torch.no_grad()
def test_logits_match_transformers_without_and_with_the_cache_batch2(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 9))  # past the original length: longrope's long factors
    cache = model.make_cache(batch_size=2, max_seq_len=96)
    ours = model(ids, cache, 0)
    torch.testing.assert_close(ours, reference(ids).logits, atol=1e-4, rtol=1e-4)
    # decode steps through the cache, each compared with a full recompute by transformers (no cache)
    seq = ids
    for _ in range(12):
        nxt = ours[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        ours = model(nxt, cache, seq.shape[1] - 1)
        torch.testing.assert_close(ours[:, -1], reference(seq).logits[:, -1], atol=1e-4, rtol=1e-4)
    # and transformers' own cached decoding agrees from its first step past the original length
    theirs = reference(seq[:, :-1], use_cache=True)
    step = reference(seq[:, -1:], cache=theirs.cache, use_cache=True).logits
    torch.testing.assert_close(ours, step, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_chunked_prefill_equals_one_pass(checkpoint):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    model = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 45))
    whole = model(ids, model.make_cache(2, 64), 0)
    cache = model.make_cache(2, 64)
    parts = [model(ids[:, a:b], cache, a) for a, b in [(0, 7), (7, 33), (33, 45)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("cuts", [[3], [2, 4]])
def test_two_and_three_stages_give_the_whole_models_logits(checkpoint, cuts):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    bounds = [0, *cuts, TINY["num_hidden_layers"]]
    stages = [load_checkpoint_stage(path, a, b) for a, b in itertools.pairwise(bounds)]
    whole = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 4))
    h: torch.Tensor = ids
    for stage in stages:
        h = stage(h, stage.make_cache(2, 64), 0)
    torch.testing.assert_close(h, whole(ids, whole.make_cache(2, 64), 0), atol=1e-5, rtol=1e-5)
    assert stages[0].embed_tokens is not None and stages[0].lm_head is None
    assert stages[-1].embed_tokens is None and stages[-1].lm_head is not None


@torch.no_grad()
def test_the_batch_engine_generates_transformers_greedy_tokens(tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint("partial-rotary", tmp_path)
    model = load_checkpoint_stage(tmp_path)
    args = model_args(safetensors_loader.read_config(tmp_path))
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchBatchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=4096))
    run = run_greedy(engine, greedy_task(words(*range(3, 3 + ORIGINAL + 5)), tokens=16))
    assert len(run.prompt) > ORIGINAL and len(run.generated) == 16
    theirs = reference.generate(torch.tensor([run.prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    assert run.generated == theirs[0, len(run.prompt):].tolist()


CONFIG = {**TINY, "model_type": "phi3", "rope_theta": 10000.0}


def test_a_phi3_config_json_of_transformers_4_reads_as_transformers_reads_it():
    """Phi-4-mini's keys: the scaling as `type` (Phi-3's `su` is longrope), original_max_position_embeddings and
    partial_rotary_factor at the top level."""
    config = {**CONFIG, "partial_rotary_factor": 0.75, "original_max_position_embeddings": 64,
              "sliding_window": 200, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attention_dropout": 0.1,
              "rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [4.0] * 6}}
    args = model_args(config)
    assert args.rope_scaling is not None and args.rope_scaling["rope_type"] == "longrope"
    assert args.rope_scaling["original_max_position_embeddings"] == 64
    assert args.rotary_dim == 12
    assert args.context_length == 200  # at most the sliding window's positions
    theirs = transformers.Phi3Config(**{k: v for k, v in config.items() if k != "model_type"})
    assert theirs.rope_parameters["rope_type"] == "longrope"
    assert theirs.rope_parameters["original_max_position_embeddings"] == 64


def test_a_bad_partial_rotary_factor_or_factor_count_fails_saying_why():
    with pytest.raises(ModelLoadError, match="partial_rotary_factor 0.2 of head_dim 16 rotates 3"):
        model_args({**CONFIG, "partial_rotary_factor": 0.2, "rope_scaling": None})
    with pytest.raises(ModelLoadError, match="a rotary part of 8 of head_dim 16 needs 4"):
        build_stage(model_args({**CONFIG, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 64,
                                "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                                 "long_factor": [1.0] * 8}}))


def test_a_quantised_phi3_checkpoint_is_refused_by_name():
    with pytest.raises(ModelLoadError, match="quantised phi3 checkpoint.*bf16"):
        model_args({**CONFIG, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                      "zero_point": True, "version": "gemm"}})


@torch.no_grad()
def test_the_fused_decode_step_runs_a_longrope_checkpoint_as_the_eager_forward(tmp_path):  # type: ignore[no-untyped-def]
    """The fused Triton step (by Triton's interpreter on CPU tensors; tests/worker/gpu runs it compiled) over the
    longrope tables and fused weights of a Phi-3 checkpoint."""
    pytest.importorskip("triton")
    from ringlet.worker.engines.torch import fused_decode

    if not fused_decode._INTERPRETED:
        pytest.skip("a GPU machine: the compiled kernels are tested through the engine in tests/worker/gpu")
    make_checkpoint("longrope", tmp_path)
    model = load_checkpoint_stage(tmp_path)
    eager_cache, fused_cache = model.make_cache(1, 64), model.make_cache(1, 64)
    token, position = torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)
    step = fused_decode.FusedDecodeStep(model, fused_cache, token, position)
    prompt = torch.randint(0, TINY["vocab_size"], (1, ORIGINAL + 3))
    for cache in (eager_cache, fused_cache):
        model(prompt, cache, 0)
    for offset, next_id in enumerate([7, 100]):
        at = prompt.shape[1] + offset
        want = model(torch.tensor([[next_id]]), eager_cache, at, last_logits_only=True)[:, -1]
        token.fill_(next_id)
        position.fill_(at)
        torch.testing.assert_close(step(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_the_fused_cuda_steps_leave_a_partial_rotary_model_to_the_plain_path():
    pytest.importorskip("triton")
    from ringlet.worker.engines.torch.fused_decode import unsupported_reason

    whole = build_stage(model_args({**CONFIG, "partial_rotary_factor": 0.75, "rope_scaling": None}))
    assert unsupported_reason(whole) == "a partial rotary embedding (12 of head_dim 16)"
    assert unsupported_reason(build_stage(model_args(CONFIG))) is None


def write_phi3_gguf(reference: transformers.Phi3ForCausalLM, path: Path, linears: Q = Q.F32) -> None:
    """The checkpoint as llama.cpp's converter (Phi3MiniModel) writes it: fused attn_qkv and ffn_up (gate, then up),
    the rotary dims a head, longrope's factors as two tensors and its attention factor, the sliding window (0: none)."""
    config = reference.config
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(config.sliding_window or 0)
    writer.add_uint32("tokenizer.ggml.eos_token_id", config.eos_token_id)
    state = {name: tensor.numpy() for name, tensor in reference.state_dict().items()}

    def add(name: str, values: np.ndarray, qtype: Q = Q.F32) -> None:
        writer.add_tensor(name, encode(values.astype(np.float32), qtype), raw_dtype=raw_dtype(qtype))

    if rope.get("rope_type") == "longrope":
        original = config.original_max_position_embeddings
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(config.max_position_embeddings / original)
                                                       / math.log(original)))
        add("rope_factors_long.weight", np.array(rope["long_factor"]))
        add("rope_factors_short.weight", np.array(rope["short_factor"]))
    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.qkv_proj.weight": "attn_qkv.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(config.num_hidden_layers):
        for hf, name in names.items():
            add(f"blk.{i}.{name}", state[f"model.layers.{i}.{hf}"], Q.F32 if "norm" in name else linears)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
@pytest.mark.parametrize("name", ["longrope", "partial-rotary"])
def test_a_phi3_gguf_file_gives_transformers_logits(name, tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint(name, tmp_path / "hf")
    write_phi3_gguf(reference, tmp_path / "phi3.gguf")
    file = GGUFModel.open(tmp_path / "phi3.gguf")
    args = model_args(file.config)
    assert (args.rotary_dim, args.sliding_window) == ((12, None) if name == "partial-rotary" else (16, 512))
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 6))
    theirs = reference(ids).logits
    for bounds in ([0, 6], [0, 2, 6]):  # one stage, then two
        h: torch.Tensor = ids
        for start, end in itertools.pairwise(bounds):
            stage = build_stage(args, start, end, weights=file.lazy_state_dict(start, end))
            h = stage(h, stage.make_cache(2, 64), 0)
        torch.testing.assert_close(h, theirs, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_phi3_gguf_files_4_bit_fused_linears_run_as_their_own_groups(tmp_path):  # type: ignore[no-untyped-def]
    reference = make_checkpoint("longrope", tmp_path / "hf")
    write_phi3_gguf(reference, tmp_path / "phi3.gguf", linears=Q.Q4_0)
    file = GGUFModel.open(tmp_path / "phi3.gguf")
    args = model_args(file.config)
    groups = file.stage_groups(0, args.num_hidden_layers)
    assert groups is not None
    dequantised = build_stage(args, weights=file.lazy_state_dict(0, args.num_hidden_layers))

    def finish_layer(layer: torch.nn.Module, index: int) -> None:
        quantize_layer_int4(layer, index, torch.float32, groups.load_groups(index, index + 1), file_groups=True,
                            device="cpu")

    int4 = build_stage(args, weights=file.lazy_state_dict(0, args.num_hidden_layers, groups=groups),
                       finish_layer=finish_layer)
    assert isinstance(int4.layers[0].self_attn.qkv_proj, Int4Linear) and isinstance(int4.layers[0].mlp.gate_up_proj,
                                                                                     Int4Linear)
    ids = torch.randint(0, TINY["vocab_size"], (2, ORIGINAL + 6))
    torch.testing.assert_close(int4(ids, int4.make_cache(2, 64), 0),
                               dequantised(ids, dequantised.make_cache(2, 64), 0), atol=1e-3, rtol=1e-3)
