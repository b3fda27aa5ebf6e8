"""Writes a GGUF file of random weights shaped like a known model, in llama.cpp's Q4_K_M mix, for measuring loads.

    python scripts/write_random_gguf.py llama-3.1-8b /tmp/llama-8b-q4_k_m.gguf

The mix is the one `llama-quantize ... Q4_K_M` makes of a Llama: Q4_K for most linears and the embedding, Q6_K
for the output and for half of the layers' attn_v and ffn_down (the first and last eighth, and every third layer
between), F32 norms. Blocks are random bytes with small finite fp16 scales, so every value decodes to a finite
number; the tokenizer is a byte-level one of 258 tokens (enough to load and encode, not to read). Tensors are
streamed to the file one at a time: writing an 8B-shaped file holds one tensor in memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tokenizers import pre_tokenizers

from ringlet.models.shapes import SHAPES

Q4_K, Q6_K = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K
SCALE = np.float16(0.002)  # every block's d (and Q4_K's dmin): random codes times it stay small


def more_bits(layer: int, layers: int) -> bool:
    """Which layers' attn_v and ffn_down llama.cpp's Q4_K_M keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, rows: int, columns: int) -> np.ndarray:
    """Random blocks of `qtype` for a [rows, columns] tensor, with the scale fields set to `SCALE`."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * columns // block, size), dtype=np.uint8)
    scale = np.frombuffer(SCALE.tobytes(), dtype=np.uint8)
    if qtype == Q4_K:  # d, dmin first
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    else:  # Q6_K: int8 sub-block scales, then d last
        blocks[:, 192:208] &= 0x1F
        blocks[:, 208:210] = scale
    return blocks.reshape(rows, -1)


def tensors(config: dict[str, int]) -> Iterator[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    yield "token_embd.weight", (config["vocab_size"], hidden), Q4_K
    for i in range(layers):
        v_down = Q6_K if more_bits(i, layers) else Q4_K
        yield f"blk.{i}.attn_norm.weight", (hidden,), GGMLQuantizationType.F32
        yield f"blk.{i}.attn_q.weight", (hidden, hidden), Q4_K
        yield f"blk.{i}.attn_k.weight", (kv, hidden), Q4_K
        yield f"blk.{i}.attn_v.weight", (kv, hidden), v_down
        yield f"blk.{i}.attn_output.weight", (hidden, hidden), Q4_K
        yield f"blk.{i}.ffn_norm.weight", (hidden,), GGMLQuantizationType.F32
        yield f"blk.{i}.ffn_gate.weight", (inter, hidden), Q4_K
        yield f"blk.{i}.ffn_up.weight", (inter, hidden), Q4_K
        yield f"blk.{i}.ffn_down.weight", (hidden, inter), v_down
    yield "output_norm.weight", (hidden,), GGMLQuantizationType.F32
    if not config.get("tie_word_embeddings"):
        yield "output.weight", (config["vocab_size"], hidden), Q6_K


def write(shape: str, path: Path) -> int:
    config = SHAPES[shape]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random {shape} Q4_K_M")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(8192)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "<|end|>"])
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(257)
    plan = list(tensors(config))
    for name, shape_, qtype in plan:
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor_info(name, shape_, np.dtype(np.float32), 4 * int(np.prod(shape_)))
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            rows, columns = shape_
            writer.add_tensor_info(name, (rows, columns // block * size), np.dtype(np.uint8),
                                   rows * columns // block * size, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape_, qtype in plan:
        if qtype == GGMLQuantizationType.F32:
            writer.write_tensor_data(np.ones(shape_, dtype=np.float32))
        else:
            writer.write_tensor_data(random_blocks(rng, qtype, *shape_))
    writer.close()
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    size = write(args.shape, args.out)
    print(f"{args.out}: {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
