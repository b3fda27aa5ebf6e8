"""Weights and hyper-parameters from a llama.cpp GGUF file, under Hugging Face names.

A pipeline stage asks for its own layer range only, so `load_state_dict(start, end)` reads and
dequantises just those tensors (the file is memory-mapped; untouched tensors cost nothing).

    model = GGUFModel.open(path)
    args = ModelArgs.from_dict(model.config)
    weights = model.load_state_dict(0, args.num_hidden_layers)
    tokenizer = model.tokenizer()
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf import quants as gguf_quants

from ringlet.models.quant import GroupQuantized
from ringlet.models.store import split_gguf_parts
from ringlet.models.tokenizer import Tokenizer, gguf_metadata
from ringlet.models.weights import LazyWeights
from ringlet.shared.errors import ModelLoadError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# general.architecture -> model_type. llama.cpp's converter permutes the q/k rows of the
# Llama-derived architectures only (LlamaModel.permute); Qwen files keep the HF layout.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_QK = {"llama", "mistral"}

# GGUF tensor name inside `blk.{i}.` -> HF name inside `model.layers.{i}.`
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BIAS_TENSORS = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_QK_NORM_TENSORS = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}

# Llama 3.1/3.2 rope scaling as Meta ships it; llama.cpp stores only the per-frequency factors it
# implies (`rope_freqs.weight`), so we recover the parameters and check they reproduce the tensor.
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class GGUFModel:
    """A GGUF model file opened for reading: `config`, `load_state_dict(start, end)`, `tokenizer()`."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        readers = _open_parts(path)
        self.path = split_gguf_parts(path)[0] if len(readers) > 1 else path  # the file with the metadata
        self._reader = readers[0]
        self._tensors: dict[str, ReaderTensor] = {t.name: t for reader in readers for t in reader.tensors}
        self._maps = {t.name: reader.data for reader in readers for t in reader.tensors}  # each tensor's file map
        self.architecture = str(self._metadata("general.architecture", required=True))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path}: unsupported GGUF architecture {self.architecture!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        self.config: dict[str, Any] = self._build_config()

    @classmethod
    def open(cls, path: str | Path) -> GGUFModel:
        return cls(path)

    # ---- metadata -------------------------------------------------------------------------

    def _metadata(self, key: str, default: Any = None, required: bool = False) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if required:
                raise ModelLoadError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def _arch(self, key: str, default: Any = None, required: bool = False) -> Any:
        return self._metadata(f"{self.architecture}.{key}", default, required)

    def _build_config(self) -> dict[str, Any]:
        """A Hugging Face config.json equivalent, so ModelArgs.from_dict reads GGUF and HF alike."""
        heads = int(self._arch("attention.head_count", required=True))
        embed = self._tensors.get("token_embd.weight")
        vocab_size = self._arch("vocab_size") or (int(embed.shape[-1]) if embed is not None else None)
        if vocab_size is None:
            raise ModelLoadError(f"{self.path}: no vocab_size metadata and no token_embd.weight tensor")
        config: dict[str, Any] = {
            "model_type": SUPPORTED_ARCHITECTURES[self.architecture],
            "hidden_size": int(self._arch("embedding_length", required=True)),
            "intermediate_size": int(self._arch("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._arch("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch("attention.head_count_kv", heads)),
            "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
            "vocab_size": int(vocab_size),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
        }
        optional = {
            "head_dim": self._arch("attention.key_length"),
            "rope_theta": self._arch("rope.freq_base"),
            "max_position_embeddings": self._arch("context_length"),
            "bos_token_id": self._metadata("tokenizer.ggml.bos_token_id"),
        }
        config.update({k: v for k, v in optional.items() if v is not None})
        eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
        eos = [int(v) for k in eos_keys if (v := self._metadata(f"tokenizer.ggml.{k}")) is not None]
        config["eos_token_id"] = list(dict.fromkeys(eos))  # unique, in order
        rope_scaling = self._rope_scaling(config)
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        return config

    def _rope_scaling(self, config: dict[str, Any]) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type")
        if kind is not None and kind != "none":
            scaling: dict[str, Any] = {"rope_type": kind, "factor": float(self._arch("rope.scaling.factor", 1.0))}
            original = self._arch("rope.scaling.original_context_length")
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            return scaling
        if "rope_freqs.weight" in self._tensors:
            return self._llama3_rope_scaling(config)
        return None

    def _llama3_rope_scaling(self, config: dict[str, Any]) -> dict[str, Any]:
        """Invert llama.cpp's LlamaModel.generate_extra_tensors (Llama 3.1+ `rope_freqs.weight`)."""
        factors = self._read_tensor("rope_freqs.weight").double()
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), **_LLAMA3_ROPE_DEFAULTS}
        expected = _llama3_rope_factors(float(config.get("rope_theta", 10000.0)), head_dim, scaling)
        if expected.shape != factors.shape or not torch.allclose(expected, factors, rtol=1e-4):
            raise ModelLoadError(
                f"{self.path}: rope_freqs.weight does not match Llama 3 rope scaling with "
                f"{_LLAMA3_ROPE_DEFAULTS}; this rope scaling is not supported"
            )
        return scaling

    # ---- tensors --------------------------------------------------------------------------

    def load_state_dict(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named tensors of layers start <= i < end (global indices), plus what the stage's ends need.

        The first stage (start == 0) gets `model.embed_tokens.weight`; the last stage (end ==
        num_hidden_layers) gets `model.norm.weight` and `lm_head.weight`. When the embeddings are
        tied (no `output.weight` in the file) there is no `lm_head.weight`: the last stage gets
        `model.embed_tokens.weight` instead, even when it is not the first, to use as its lm_head.
        """
        return dict(self.lazy_state_dict(start, end, dtype))

    def lazy_state_dict(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> LazyWeights:
        """The same tensors, each read and converted to `dtype` only when it is looked up."""
        names = self._stage_names(start, end)
        return LazyWeights({hf: functools.partial(self._read_as, gguf_name, dtype) for gguf_name, hf in names.items()})

    def _read_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self._read_tensor(name).to(dtype)

    def _stage_names(self, start: int, end: int) -> dict[str, str]:
        """GGUF name -> HF name of every tensor the stage [start, end) needs; all of them must be in the file."""
        num_layers = self.config["num_hidden_layers"]
        if not 0 <= start < end <= num_layers:
            raise ModelLoadError(f"layer range [{start}, {end}) is outside the model's {num_layers} layers")
        names: dict[str, str] = {}
        last = end == num_layers
        if start == 0 or (last and self.config["tie_word_embeddings"]):
            names["token_embd.weight"] = "model.embed_tokens.weight"
        for i in range(start, end):
            names.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in self._layer_tensor_names().items()})
        if last:
            names["output_norm.weight"] = "model.norm.weight"
            if not self.config["tie_word_embeddings"]:
                names["output.weight"] = "lm_head.weight"

        missing = [name for name in names if name not in self._tensors]
        if missing:
            raise ModelLoadError(
                f"{self.path}: tensors missing from the GGUF file: {', '.join(missing[:8])}"
                + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
            )
        return names

    def stores_groups(self, start: int, end: int) -> bool:
        """Whether any linear weight of layers [start, end) is stored in a 4-bit type the int4 kernel takes as it
        is (`load_groups`): read from the tensors' types, no data. When so, one log line names the quantised types
        of the others, which are dequantised."""
        types = Counter(GGMLQuantizationType(tensor.tensor_type) for i in range(start, end)
                        for g in self._layer_tensor_names() if g.endswith(".weight")
                        and (tensor := self._tensors.get(f"blk.{i}.{g}")) is not None and len(tensor.shape) == 2)
        grouped = any(qtype in _GROUPED for qtype in types)
        others = {qtype.name: count for qtype, count in types.items() if qtype not in _GROUPED and qtype not in _FLOAT_TYPES}
        if grouped and others:
            log.info("%s: weights of layers %d-%d stored as %s are dequantised (not 4-bit groups)", self.path.name,
                     start, end - 1, ", ".join(f"{kind} ({count})" for kind, count in sorted(others.items())))
        return grouped

    def load_groups(self, start: int, end: int) -> dict[str, GroupQuantized]:
        """The Q4_0/Q4_1/Q4_K weights of layers [start, end) as their own 4-bit codes and per-32 scales/offsets (HF
        names and layout), for int4 kernels that take them as they are; weights of other types are left out."""
        groups = {}
        for i in range(start, end):
            for gguf_name, hf_name in self._layer_tensor_names().items():
                name = f"blk.{i}.{gguf_name}"
                tensor = self._tensors.get(name)
                if tensor is not None and GGMLQuantizationType(tensor.tensor_type) in _GROUPED:
                    groups[f"model.layers.{i}.{hf_name}"] = self._read_groups(name)
        return groups

    def _read_groups(self, name: str) -> GroupQuantized:
        tensor = self._tensors[name]
        rows, columns = (int(d) for d in reversed(tensor.shape.tolist()))
        codes, scale, offset = _GROUPED[GGMLQuantizationType(tensor.tensor_type)](
            np.asarray(tensor.data).reshape(-1).view(np.uint8))
        arrays = [codes.reshape(rows, columns), scale.reshape(rows, -1), offset.reshape(rows, -1)]
        if self.architecture in _PERMUTED_QK and (".attn_q." in name or ".attn_k." in name):
            heads = self.config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            arrays = [unpermute_qk(a, heads) for a in arrays]
        codes_t, scale_t, offset_t = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        self._release(name)
        return GroupQuantized(codes_t, scale_t, offset_t)

    def _release(self, name: str) -> None:
        """Drop the file's pages of a tensor decoded into memory of its own from this process's resident memory
        (they stay in the page cache): a mapped page once read stays resident, and a load would otherwise grow by
        the whole file on top of the weights it keeps. Where the map or madvise is missing, the pages just stay."""
        mapped = getattr(self._maps[name], "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        tensor = self._tensors[name]
        first = int(tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first, int(tensor.data_offset) + int(tensor.n_bytes) - first)

    def _layer_tensor_names(self) -> dict[str, str]:
        names = dict(_LAYER_TENSORS)
        if self.config["attention_bias"]:
            names.update(_BIAS_TENSORS)
        if self.config["model_type"] == "qwen3":
            names.update(_QK_NORM_TENSORS)
        return names

    def _read_tensor(self, name: str) -> torch.Tensor:
        """Dequantise one tensor to float32, in HF layout (row-major [out, in], q/k un-permuted)."""
        tensor = self._tensors[name]
        qtype = GGMLQuantizationType(tensor.tensor_type)
        # GGUF lists dimensions innermost first; torch wants them outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            values = dequantize_tensor(tensor.data, qtype)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"{self.path}: tensor {name} has GGML type {qtype.name}, which cannot be dequantised"
            ) from e
        if values.size != math.prod(shape):
            raise ModelLoadError(f"{self.path}: tensor {name} holds {values.size} values, expected shape {shape}")
        values = values.reshape(shape)
        if self.architecture in _PERMUTED_QK and (".attn_q." in name or ".attn_k." in name):
            heads = self.config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            values = unpermute_qk(values, heads)
        self._release(name)  # every decoder above returns an array of its own, never a view of the map
        return torch.from_numpy(values)

    # ---- tokenizer ------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf_file(self.path, gguf_metadata(self._reader))


def dequantize_tensor(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Values of a GGUF tensor as a fresh, flat float32 array.

    The common types are decoded here over the whole tensor at once; the rest (the K-quants, the IQ types) by
    gguf.quants' own block decoders over long runs of blocks (its `dequantize` walks 16 rows at a time, several
    times slower). Same arithmetic as ggml's dequantize_row_* (d * q [+ m], with fp16 d and m), so the results are
    bit-identical. numpy, not torch: torch's OpenMP threads stall badly when the cores are shared with other
    processes.
    """
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    decode = _DEQUANT.get(qtype)
    return decode(raw) if decode is not None else _by_blocks(raw, qtype)


_RUN_BYTES = 8 << 20  # bytes of blocks decoded at once: bounds the decoder's temporaries (a few times 4x this)


def _by_blocks(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Through gguf.quants' block decoder for the type, a run of blocks at a time into one output array."""
    decoder = getattr(gguf_quants, qtype.name, None)
    if decoder is None or qtype not in GGML_QUANT_SIZES:
        raise NotImplementedError(f"gguf.quants has no decoder for {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    decoder.init_grid()  # the IQ types' lookup tables
    blocks = raw.reshape(-1, type_size)
    out = np.empty(blocks.shape[0] * block_size, dtype=np.float32)
    run = max(1, _RUN_BYTES // type_size)
    for start in range(0, blocks.shape[0], run):
        part = blocks[start:start + run]
        out[start * block_size:(start + part.shape[0]) * block_size] = decoder.dequantize_blocks(part).reshape(-1)
    return out


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scale at byte `start` of each block, as a float32 column."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """ggml packs element j in the low nibble and j + 16 in the high nibble of byte j."""
    out = np.empty((packed.shape[0], 2 * packed.shape[1]), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[:, :packed.shape[1]])
    np.right_shift(packed, 4, out=out[:, packed.shape[1]:])
    return out


def _q8_0(raw: np.ndarray) -> np.ndarray:  # block: fp16 d, 32 x int8; x = d * q
    blocks = raw.reshape(-1, 34)
    values: np.ndarray = _half(blocks, 0) * blocks[:, 2:].view(np.int8)
    return values.reshape(-1)


def _q4_0(raw: np.ndarray) -> np.ndarray:  # block: fp16 d, 16 bytes of 4-bit q; x = d * (q - 8)
    blocks = raw.reshape(-1, 18)
    centred = _nibbles(blocks[:, 2:]).view(np.int8) - np.int8(8)
    values: np.ndarray = _half(blocks, 0) * centred
    return values.reshape(-1)


def _q4_1(raw: np.ndarray) -> np.ndarray:  # block: fp16 d, fp16 m, 16 bytes of 4-bit q; x = d * q + m
    blocks = raw.reshape(-1, 20)
    values: np.ndarray = _half(blocks, 0) * _nibbles(blocks[:, 4:]) + _half(blocks, 2)
    return values.reshape(-1)


def _q4_0_groups(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # x = d * q - 8 d
    blocks = raw.reshape(-1, 18)
    d = _half(blocks, 0)
    return _nibbles(blocks[:, 2:]), d, -8 * d


def _q4_1_groups(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # x = d * q + m
    blocks = raw.reshape(-1, 20)
    return _nibbles(blocks[:, 4:]), _half(blocks, 0), _half(blocks, 2)


def _q4_k_groups(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks of 256: fp16 d and dmin, 6-bit scales and mins of its 8 groups of 32, 128 bytes of 4-bit codes
    (64 values per 32 bytes: the low nibbles, then the high ones); x = d * scale * q - dmin * min."""
    blocks = raw.reshape(-1, 144)
    scales, mins = gguf_quants.Q4_K.get_scale_min(blocks[:, 4:16])
    scale = _half(blocks, 0) * scales.astype(np.float32)
    offset = -(_half(blocks, 2) * mins.astype(np.float32))
    packed = blocks[:, 16:].reshape(-1, 4, 1, 32)
    codes = (packed >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    return codes.reshape(-1, 256), scale, offset


_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
# 4-bit types whose blocks hold groups of (32 codes, scale, offset): codes, scale and offset per group
_GROUPED = {GGMLQuantizationType.Q4_0: _q4_0_groups, GGMLQuantizationType.Q4_1: _q4_1_groups,
            GGMLQuantizationType.Q4_K: _q4_k_groups}


def _bf16(raw: np.ndarray) -> np.ndarray:  # the high half of a float32
    high: np.ndarray = raw.view(np.uint16).astype(np.uint32) << 16
    return high.view(np.float32)


_DEQUANT: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLQuantizationType.F32: lambda raw: raw.view(np.float32).copy(),  # copy out of the read-only map
    GGMLQuantizationType.F16: lambda raw: raw.view(np.float16).astype(np.float32),
    GGMLQuantizationType.BF16: _bf16,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
}


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (interleaved rotary pairs -> HF's rotate-half halves).

    llama.cpp: w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2); this is its inverse,
    written exactly as transformers' LlamaTensorProcessor._reverse_permute_weights does it.
    """
    half_head = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half_head, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1)).reshape(weight.shape)


def _llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), mid)
    return torch.where(wavelen < old_context / high, torch.ones_like(freqs), out)


def is_gguf(path: Path) -> bool:
    """Whether the file starts like a GGUF file (whatever its name: Ollama's blobs have no suffix)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_size(path: Path) -> int:
    """Bytes of a GGUF model on disk, every part of a split model counted."""
    return sum(part.stat().st_size for part in split_gguf_parts(path) if part.is_file())


def _open_parts(path: Path) -> list[GGUFReader]:
    """Readers of every file of the model, the first file first; one for a model in one file."""
    reader = _open_reader(path)
    field = reader.fields.get("split.count")
    count = int(field.contents()) if field is not None else 1
    if count <= 1:
        return [reader]
    parts = split_gguf_parts(path)
    if len(parts) != count:
        raise ModelLoadError(f"{path} is one of {count} files of a split GGUF model, but its name does not say which "
                             f"(llama.cpp names them NAME-00001-of-{count:05d}.gguf, ...); rename it so")
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise ModelLoadError(f"{path} is one of {count} files of a split GGUF model; {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}")
    readers = [reader if part == path else _open_reader(part) for part in parts]
    expected = readers[0].fields.get("split.tensors.count")
    found = sum(len(r.tensors) for r in readers)
    if expected is not None and int(expected.contents()) != found:
        raise ModelLoadError(f"{parts[0]}: the split GGUF model lists {int(expected.contents())} tensors but its "
                             f"{count} files hold {found}; download its parts again")
    return readers


def _open_reader(path: Path) -> GGUFReader:
    """GGUFReader, with every way a bad file fails turned into one ModelLoadError that names it."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    # The reader indexes a memory map and reshapes views of it; a cut or corrupt file shows up as
    # any of these, deep inside gguf/numpy.
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{path}: GGUF file is truncated or corrupt ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":  # tensor bytes are decoded as little-endian below
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    size = path.stat().st_size
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise ModelLoadError(f"{path}: GGUF file is truncated (tensor {tensor.name} runs past the end)")
    return reader
