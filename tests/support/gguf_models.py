"""Small GGUF models written here for the loader's tests: blocks of every GGML type (gguf.quants' quantiser where it
has one, else random blocks with finite scales), a two-layer Llama whose linears are in chosen types, and the
tolerances of its logits when its weights run as int4/int8."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

DECODED = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0]
QUANTISED_HERE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}  # gguf.quants has a quantiser for these
# byte offsets of each block's fp16 scales (d, and dmin where the type has one), and about how large its values are
# for d = 1 (random 6-bit scales and codes: Q4_K ~ 32 * 7.5, Q6_K ~ 64 * 16 ...)
HALVES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}
UNIT = {Q.Q4_K: 240, Q.Q5_K: 480, Q.Q6_K: 1000, Q.Q2_K: 11, Q.Q3_K: 32}


def blocks_of(qtype: Q, values: int, seed: int = 0, size: float = 1.0) -> np.ndarray:
    """The bytes of `values` values of about `size` in `qtype`: what gguf.quants' quantiser makes of random numbers
    where it has one, else random blocks whose fp16 scales are finite (some subnormal)."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTISED_HERE:
        numbers = rng.standard_normal((1, values), dtype=np.float32) * np.float32(size)
        return gguf.quants.quantize(numbers, qtype).reshape(-1)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(values // block_size, type_size), dtype=np.uint8)
    for at in HALVES[qtype]:
        d = rng.uniform(0.05, 1.0, (raw.shape[0], 1)) * size / UNIT[qtype]
        raw[:, at:at + 2] = d.astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


def reference(raw: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).reshape(-1).astype(np.float32)


# ---- small models --------------------------------------------------------------------------------------------------

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 260
LINEARS = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HIDDEN // HEADS, HIDDEN),
           "attn_v": (KV_HEADS * HIDDEN // HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
           "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def write_model(path: Path, types: dict[str, Q], seed: int = 0) -> dict[str, torch.Tensor]:
    """A two-layer Llama whose linears are stored in `types` (by GGUF name inside `blk.{i}.`), with a byte-level
    tokenizer; returns its weights as gguf.quants decodes them, in HF names and layout (q/k un-permuted)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": LAYERS, "context_length": 256, "embedding_length": HIDDEN,
                       "feed_forward_length": INTER, "head_count": HEADS, "head_count_kv": KV_HEADS}.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", *(f"<x{i}>" for i in range(3))])
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(0)
    rng = np.random.default_rng(seed)
    weights: dict[str, torch.Tensor] = {}

    def add(name: str, hf: str, shape: tuple[int, ...], qtype: Q, spread: float = 0.0) -> None:
        if qtype == Q.F32:
            data = 1 + rng.standard_normal(shape, dtype=np.float32) * np.float32(spread)  # a norm's weight
            values = data.copy()
        else:
            data = blocks_of(qtype, int(np.prod(shape)), int(rng.integers(1 << 30)), 0.06).reshape(shape[0], -1)
            values = reference(data, qtype).reshape(shape)
        writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # transformers' _reverse_permute_weights
            heads = HEADS if "attn_q" in name else KV_HEADS
            values = values.reshape(heads, shape[0] // heads // 2, 2, -1).swapaxes(2, 1).reshape(shape)
        weights[hf] = torch.from_numpy(np.ascontiguousarray(values))

    add("token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN), Q.Q8_0)
    for i in range(LAYERS):
        for name, shape in LINEARS.items():
            add(f"blk.{i}.{name}.weight", f"model.layers.{i}.{HF_NAMES[name]}.weight", shape, types[name])
        for norm, hf in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            add(f"blk.{i}.{norm}.weight", f"model.layers.{i}.{hf}.weight", (HIDDEN,), Q.F32, 0.1)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,), Q.F32)
    add("output.weight", "lm_head.weight", (VOCAB, HIDDEN), Q.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 50, 9, 200, 33, 7]])
    with torch.inference_mode():
        return model(ids, model.make_cache(1, 16), 0).float()  # type: ignore[operator]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# int4 where stored: the 4-bit types run their own codes; the others are rounded to int8 per channel (bf16 compute)
# (relative errors of the logits measured: 0.007-0.014 for the 4-bit types, 0.008-0.026 for the others, by
# `pytest tests/models/test_gguf_types.py -k each_type` with the errors printed)
TOLERANCE = {Q.Q4_0: 0.03, Q.Q4_1: 0.03, Q.Q4_K: 0.03, Q.Q5_0: 0.05, Q.Q5_1: 0.05, Q.Q5_K: 0.05, Q.Q6_K: 0.05,
             Q.Q8_0: 0.05}
