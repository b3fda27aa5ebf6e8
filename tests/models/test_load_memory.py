"""Loading holds one layer at a time: the peak resident memory of a load stays near the bytes it keeps, measured in a
process of its own on GGUF files of a few hundred MB written here (F16; Q4_K with Q6_K, loaded as int4 where stored,
through the repack cache and from it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

pytestmark = pytest.mark.slow

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 1024, 2816, 16, 32000, 16, 8
# bytes beyond what a stage keeps that its load may peak at: a layer as it is converted, slices of the embedding and
# lm_head, the file's metadata and the tokenizer, the allocator's slack (measured 34-115 MB over by the loads below,
# `pytest tests/models/test_load_memory.py` with the difference printed)
MARGIN = 320 << 20

# The peak is the kernel's high-water mark of this process's memory (VmHWM). getrusage's ru_maxrss would not do: it
# survives exec, so a child of a large pytest process starts at its parent's size.
LOAD = """
import json, os, sys
import torch
import ringlet.models.gguf_loader, ringlet.models.llama  # imported before the baseline: code is not weights
import torch._dynamo  # which an int8 load imports as it goes: code too
from ringlet.worker.engines.torch.engine import load_torch_stage
def resident(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = resident()
stage, precision = load_torch_stage(sys.argv[1], precision=sys.argv[2])
model = stage.model
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"before": before, "peak": peak, "held": held, "precision": precision}))
"""


def _writer(path: Path, layers: int) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt"])
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(0)
    return writer


def _close(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _linears(i: int) -> dict[str, tuple[int, int]]:
    kv = KV_HEADS * HIDDEN // HEADS
    return {f"blk.{i}.{name}.weight": shape for name, shape in {
        "attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}.items()}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-shaped model with F16 weights: 270M parameters, a byte-level tokenizer."""
    path = tmp_path_factory.mktemp("memory") / "model.gguf"
    writer = _writer(path, LAYERS)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))

    add("token_embd.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        for name, shape in _linears(i).items():
            add(name, *shape)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    add("output.weight", VOCAB, HIDDEN)
    _close(writer)
    return path


K_LAYERS = 24


@pytest.fixture(scope="module")
def k_quant_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shapes in 24 layers as llama.cpp's Q4_K_M mixes them: Q4_K, with v, down and the lm_head in Q6_K
    (random blocks with small finite fp16 scales); about 250 MB."""
    path = tmp_path_factory.mktemp("memory") / "q4_k_m.gguf"
    writer = _writer(path, K_LAYERS)
    rng = np.random.default_rng(0)
    scales = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q6_K: (208,)}

    def add(name: str, rows: int, columns: int, qtype: gguf.GGMLQuantizationType) -> None:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows * columns // block_size, type_size), dtype=np.uint8)
        for at in scales[qtype]:
            raw[:, at:at + 2] = np.array([1e-4], np.float16).view(np.uint8)
        writer.add_tensor(name, raw.reshape(rows, -1), raw_dtype=qtype)

    add("token_embd.weight", VOCAB, HIDDEN, gguf.GGMLQuantizationType.Q4_K)
    for i in range(K_LAYERS):
        for name, shape in _linears(i).items():
            wide = name.endswith(("attn_v.weight", "ffn_down.weight"))
            add(name, *shape, gguf.GGMLQuantizationType.Q6_K if wide else gguf.GGMLQuantizationType.Q4_K)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    add("output.weight", VOCAB, HIDDEN, gguf.GGMLQuantizationType.Q6_K)
    _close(writer)
    return path


@pytest.mark.parametrize("precision, kept", [("bf16", 1.0), ("int8", 0.5)])
def test_a_load_peaks_at_what_it_keeps_plus_one_layer(model_file: Path, precision: str, kept: float) -> None:
    result = subprocess.run([sys.executable, "-c", LOAD, str(model_file), precision], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    size = model_file.stat().st_size
    assert measured["precision"] == precision
    # bf16 as the F16 file; int8 a byte a weight, the embedding and lm_head too
    assert measured["held"] == pytest.approx(kept * size, rel=0.1)
    # the whole stage in fp32 first, then cast, would peak at over four times the file here
    assert measured["peak"] - measured["before"] <= measured["held"] + MARGIN, measured


def test_an_int4_load_of_a_k_quant_file_peaks_at_what_it_keeps_plus_one_layer(k_quant_file: Path,
                                                                              tmp_path: Path) -> None:
    env = {**os.environ, "RINGLET_HOME": str(tmp_path / "home")}
    env.pop("RINGLET_GGUF_CACHE", None)
    for load in ("writing the repack cache", "reading it"):
        result = subprocess.run([sys.executable, "-c", LOAD, str(k_quant_file), "auto"], capture_output=True,
                                text=True, timeout=300, check=False, env=env)
        assert result.returncode == 0, result.stderr
        measured = json.loads(result.stdout.splitlines()[-1])
        assert measured["precision"] == "int4", load
        assert measured["peak"] - measured["before"] <= measured["held"] + MARGIN, (load, measured)
        assert list((tmp_path / "home" / "cache" / "gguf").glob("*/blk.*.safetensors")), load
