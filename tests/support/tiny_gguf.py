"""Tiny GGUF files written here: a random two-layer model in llama.cpp's layout, every layer a mix of quantisation
types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 64, 4, 2, 128, 96, 2
HEAD_DIM = HIDDEN // HEADS

# HF name inside model.layers.{i}. -> (GGUF name, shape [out, in], type of layer 0, type of layer 1)
LAYER_WEIGHTS = {
    "self_attn.q_proj.weight": ("attn_q.weight", (HIDDEN, HIDDEN), Q.Q4_1, Q.F32),
    "self_attn.k_proj.weight": ("attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q8_0, Q.F16),
    "self_attn.v_proj.weight": ("attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.BF16, Q.Q4_0),
    "self_attn.o_proj.weight": ("attn_output.weight", (HIDDEN, HIDDEN), Q.Q8_0, Q.Q4_1),
    "mlp.gate_proj.weight": ("ffn_gate.weight", (INTER, HIDDEN), Q.Q4_0, Q.Q8_0),
    "mlp.up_proj.weight": ("ffn_up.weight", (INTER, HIDDEN), Q.Q4_1, Q.BF16),
    "mlp.down_proj.weight": ("ffn_down.weight", (HIDDEN, INTER), Q.F16, Q.Q4_0),
    "input_layernorm.weight": ("attn_norm.weight", (HIDDEN,), Q.F32, Q.F32),
    "post_attention_layernorm.weight": ("ffn_norm.weight", (HIDDEN,), Q.F32, Q.F32),
}
QWEN2_BIASES = {
    "self_attn.q_proj.bias": ("attn_q.bias", (HIDDEN,)),
    "self_attn.k_proj.bias": ("attn_k.bias", (KV_HEADS * HEAD_DIM,)),
    "self_attn.v_proj.bias": ("attn_v.bias", (KV_HEADS * HEAD_DIM,)),
}
QWEN3_NORMS = {
    "self_attn.q_norm.weight": ("attn_q_norm.weight", (HEAD_DIM,)),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", (HEAD_DIM,)),
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What llama.cpp would store: the raw bytes of the quantised tensor."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def raw_dtype(qtype: Q) -> Q | None:
    """GGUFWriter infers F32/F16 from the numpy dtype; the rest are bytes it must be told about."""
    return None if qtype in (Q.F32, Q.F16) else qtype


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    skip: tuple[str, ...] = (),
    tied: bool = False,
    extra_tensors: dict[str, tuple[np.ndarray, Q]] | None = None,
    seed: int = 0,
    split_max_tensors: int = 0,
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> dict[str, np.ndarray]:
    """A random two-layer model; returns the HF-layout float32 originals by HF name. With `split_max_tensors`, the
    model is split as llama.cpp's gguf-split does it: `path`'s stem, then -00001-of-0000N.gguf and so on. `metadata`
    writes keys of its own (a tokenizer) in place of the default EOS ids."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    if metadata is not None:  # a tokenizer, say
        metadata(writer)
    else:
        writer.add_uint32("tokenizer.ggml.eos_token_id", 7)
        writer.add_uint32("tokenizer.ggml.eot_token_id", 9)

    originals: dict[str, np.ndarray] = {}

    def add(hf: str, gguf_name: str, shape: tuple[int, ...], qtype: Q) -> None:
        w = rng.standard_normal(shape).astype(np.float32)
        originals[hf] = w
        stored = w
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            stored = llama_cpp_permute(w, HEADS if "attn_q" in gguf_name else KV_HEADS)
        if gguf_name not in skip:
            writer.add_tensor(gguf_name, encode(stored, qtype), raw_dtype=raw_dtype(qtype))

    add("model.embed_tokens.weight", "token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0)
    for i in range(LAYERS):
        layer = dict(LAYER_WEIGHTS)
        extras = QWEN2_BIASES if arch == "qwen2" else QWEN3_NORMS if arch == "qwen3" else {}
        for hf, (name, shape) in extras.items():
            add(f"model.layers.{i}.{hf}", f"blk.{i}.{name}", shape, Q.F32)
        for hf, (name, shape, *types) in layer.items():
            add(f"model.layers.{i}.{hf}", f"blk.{i}.{name}", shape, types[i])
    add("model.norm.weight", "output_norm.weight", (HIDDEN,), Q.F32)
    if not tied:
        add("lm_head.weight", "output.weight", (VOCAB, HIDDEN), Q.Q4_0)
    for name, (data, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype(qtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals
