"""Mixture-of-experts GGUF files (llama.cpp's `qwen3moe`, and `llama` files with experts: Mixtral) against
transformers on the same weights: stacked expert tensors of quantised types, whole and split into stages, and an int4
stage that keeps the file's 4-bit attention groups."""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from ringlet.models.experts import Int4Experts, Int8Experts
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.quant import Int4Linear, quantize_layer_int4
from ringlet.models.registry import build_stage, model_args
from tests.support.tiny_gguf import encode, llama_cpp_permute, raw_dtype

TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "num_experts_per_tok": 2, "num_hidden_layers": 3,
        "tie_word_embeddings": False}
CONFIGS = {
    "qwen3moe": lambda: transformers.Qwen3MoeConfig(**TINY, num_experts=4, moe_intermediate_size=64,
                                                    intermediate_size=96, head_dim=32, norm_topk_prob=True),
    "llama": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, intermediate_size=64),
}
# the stored type of each tensor: the experts' three stacks in three types, 4-bit attention (the int4 stage's groups)
TYPES = {"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q4_0, "attn_output.weight": Q.Q8_0,
         "ffn_gate_exps.weight": Q.Q8_0, "ffn_up_exps.weight": Q.F16, "ffn_down_exps.weight": Q.Q4_0}
# every expert stack in 4-bit groups, as a Q4_0 / Q4_1 file has them
FOUR_BIT_EXPERTS = TYPES | {"ffn_gate_exps.weight": Q.Q4_0, "ffn_up_exps.weight": Q.Q4_1}


def reference_model(arch: str) -> transformers.PreTrainedModel:
    """A random model whose routers choose (their logits differ by more than rounding) and whose logits are peaked."""
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("gate.weight"):
                p.mul_(50)
            elif "embed_tokens" in name or "lm_head" in name:
                p.mul_(20)
    return model


def write_moe_gguf(model: transformers.PreTrainedModel, arch: str, path: Path, types: dict[str, Q] = TYPES) -> None:
    """The model as llama.cpp's converter writes it (q/k rows permuted in a llama file; experts as three stacks),
    each tensor in its `TYPES` type; the model's own weights become the values the file decodes to."""
    config = model.config
    experts = config.num_local_experts if arch == "llama" else config.num_experts
    width = config.intermediate_size if arch == "llama" else config.moe_intermediate_size
    moe = "mlp"  # transformers' name in memory for both (a saved Mixtral says block_sparse_moe)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch == "qwen3moe":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_expert_feed_forward_length(width)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    state = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in model.state_dict().items()}
    decoded: dict[str, torch.Tensor] = {}

    def add(name: str, hf: str, values: np.ndarray, permute_heads: int = 0) -> None:
        qtype = types.get(name.split(".", 2)[-1], Q.F32)
        stored = llama_cpp_permute(values, permute_heads) if permute_heads else values
        data = encode(stored, qtype)
        writer.add_tensor(name, data, raw_dtype=raw_dtype(qtype))
        back = gguf.quants.dequantize(data, qtype) if raw_dtype(qtype) is not None else data.astype(np.float32)
        if permute_heads:  # the permutation is its own inverse's inverse: undo it on the decoded rows
            back = _unpermute(back.reshape(values.shape), permute_heads)
        decoded[hf] = torch.from_numpy(np.ascontiguousarray(back.reshape(values.shape)))

    add("token_embd.weight", "model.embed_tokens.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", "model.norm.weight", state["model.norm.weight"])
    add("output.weight", "lm_head.weight", state["lm_head.weight"])
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads}
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        for part, name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            key = f"{hf}self_attn.{part}_proj.weight"
            add(f"blk.{i}.{name}.weight", key, state[key], heads.get(part, 0) if arch == "llama" else 0)
        if arch == "qwen3moe":
            for part in "qk":
                key = f"{hf}self_attn.{part}_norm.weight"
                add(f"blk.{i}.attn_{part}_norm.weight", key, state[key])
        add(f"blk.{i}.attn_norm.weight", f"{hf}input_layernorm.weight", state[f"{hf}input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", f"{hf}post_attention_layernorm.weight",
            state[f"{hf}post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate_inp.weight", f"{hf}{moe}.gate.weight", state[f"{hf}{moe}.gate.weight"])
        gate_up = state[f"{hf}{moe}.experts.gate_up_proj"]
        add(f"blk.{i}.ffn_gate_exps.weight", "gate", gate_up[:, :width])
        add(f"blk.{i}.ffn_up_exps.weight", "up", gate_up[:, width:])
        decoded[f"{hf}{moe}.experts.gate_up_proj"] = torch.cat((decoded.pop("gate"), decoded.pop("up")), dim=1)
        add(f"blk.{i}.ffn_down_exps.weight", f"{hf}{moe}.experts.down_proj", state[f"{hf}{moe}.experts.down_proj"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_state_dict(decoded, strict=True)  # the reference computes with what the file holds


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def moe_file(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    model = reference_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "moe.gguf"
    write_moe_gguf(model, request.param, path)
    return request.param, model, path


def test_the_file_reads_as_the_models_config(moe_file):  # type: ignore[no-untyped-def]
    arch, _, path = moe_file
    args = model_args(GGUFModel.open(path).config)
    assert args.model_type == ("mixtral" if arch == "llama" else "qwen3_moe")
    assert (args.num_experts, args.num_experts_per_tok, args.norm_topk_prob) == (4, 2, True)
    assert args.moe_intermediate_size == 64 and args.qk_norm == (arch == "qwen3moe")


@torch.no_grad()
def test_whole_and_split_stages_give_transformers_logits(moe_file):  # type: ignore[no-untyped-def]
    _, model, path = moe_file
    file = GGUFModel.open(path)
    args = model_args(file.config)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    theirs = model(ids).logits
    for bounds in ([0, 3], [0, 1, 3], [0, 1, 2, 3]):
        h: torch.Tensor = ids
        for start, end in itertools.pairwise(bounds):
            stage = build_stage(args, start, end, weights=file.lazy_state_dict(start, end))
            h = stage(h, stage.make_cache(2, 32), 0)
        torch.testing.assert_close(h, theirs, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_an_int4_stage_keeps_the_files_attention_groups_and_rounds_the_experts_to_int8(moe_file):  # type: ignore[no-untyped-def]
    _, _, path = moe_file
    file = GGUFModel.open(path)
    args = model_args(file.config)
    groups = file.stage_groups(0, args.num_hidden_layers)
    assert groups is not None  # 4-bit attention; the stacked experts are not groups the int4 kernels take
    dequantised = build_stage(args, weights=file.lazy_state_dict(0, args.num_hidden_layers))

    def finish_layer(layer: torch.nn.Module, index: int) -> None:
        quantize_layer_int4(layer, index, torch.float32, groups.load_groups(index, index + 1), file_groups=True,
                            device="cpu")

    int4 = build_stage(args, weights=file.lazy_state_dict(0, args.num_hidden_layers, groups=groups),
                       finish_layer=finish_layer)
    block = int4.layers[0]
    assert isinstance(block.self_attn.qkv_proj, Int4Linear) and isinstance(block.mlp.experts, Int8Experts)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    ours, want = int4(ids, int4.make_cache(2, 32), 0), dequantised(ids, dequantised.make_cache(2, 32), 0)
    assert (ours.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert torch.linalg.norm(ours - want) < 0.05 * torch.linalg.norm(want)


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_experts_stored_in_4_bit_groups_run_as_their_own_codes(arch, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """An int4 stage of a file whose experts are all 4-bit: each expert's linears are the file's groups, never read
    as values, and the stage gives the dequantised file's logits."""
    write_moe_gguf(reference_model(arch), arch, tmp_path / "moe.gguf", FOUR_BIT_EXPERTS)
    file = GGUFModel.open(tmp_path / "moe.gguf")
    args = model_args(file.config)
    dequantised = build_stage(args, weights=file.lazy_state_dict(0, args.num_hidden_layers))
    groups = file.stage_groups(0, args.num_hidden_layers)
    assert groups is not None
    read = []
    original = GGUFModel._read_tensor
    monkeypatch.setattr(GGUFModel, "_read_tensor", lambda self, name, *rest: read.append(name) or original(
        self, name, *rest))

    def finish_layer(layer: torch.nn.Module, index: int) -> None:
        quantize_layer_int4(layer, index, torch.float32, groups.load_groups(index, index + 1), file_groups=True,
                            device="cpu")

    int4 = build_stage(args, weights=file.lazy_state_dict(0, args.num_hidden_layers, groups=groups),
                       finish_layer=finish_layer)
    assert not [name for name in read if "_exps" in name]
    experts = int4.layers[1].mlp.experts
    assert isinstance(experts, Int4Experts) and len(experts.gate_up) == 4
    assert all(isinstance(linear, Int4Linear) for linear in (*experts.gate_up, *experts.down))
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    want = dequantised(ids, dequantised.make_cache(2, 32), 0)
    # the same codes: what differs is the int4 kernel's arithmetic (3e-4 of the largest logit here)
    torch.testing.assert_close(int4(ids, int4.make_cache(2, 32), 0), want, atol=1e-3 * want.abs().max().item(),
                               rtol=1e-3)
