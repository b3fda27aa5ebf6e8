"""Weights and hyper-parameters from a llama.cpp GGUF file, under Hugging Face names.

A pipeline stage asks for its own layer range only, so `load_state_dict(start, end)` reads and
dequantises just those tensors (the file is memory-mapped; untouched tensors cost nothing). The blocks are decoded
by `gguf_quants`; an int4 stage takes the 4-bit ones as they are (`stage_groups`), through a `RepackCache`.

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
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType, ReaderTensor

from ringlet.models.gguf_quants import (
    DECODED_TYPES,
    FLOAT_TYPES,
    GROUPED_TYPES,
    decode_groups,
    dequantize,
    dequantize_groups,
)
from ringlet.models.quant import GroupQuantized, fused_with
from ringlet.models.repack_cache import RepackCache
from ringlet.models.store import split_gguf_parts
from ringlet.models.tokenizer import Tokenizer, gguf_metadata
from ringlet.models.weights import LazyWeights, RowReader
from ringlet.shared.errors import ModelLoadError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# general.architecture -> model_type. llama.cpp's converter permutes the q/k rows of the
# Llama-derived architectures only (LlamaModel.permute); Qwen files keep the HF layout.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "phi3": "phi3", "qwen2": "qwen2", "qwen3": "qwen3",
                           "gemma2": "gemma2", "gemma3": "gemma3_text", "qwen3moe": "qwen3_moe"}
_PERMUTED_QK = {"llama", "mistral"}
# a sparse layer's router and experts: GGUF name inside `blk.{i}.` -> HF name after the layer's MLP prefix. The experts
# are stacked 3-d tensors ([E, I, H] gate and up, [E, H, I] down), which `MoETransformer` takes as they are
_EXPERT_TENSORS = {"ffn_gate_inp.weight": "gate.weight", "ffn_gate_exps.weight": "experts.gate_proj",
                   "ffn_up_exps.weight": "experts.up_proj", "ffn_down_exps.weight": "experts.down_proj"}
# a stage reads gate and up as one tensor, each expert's gate rows followed by its up rows
_GATE_UP_EXPERTS = ("experts.gate_proj", "experts.up_proj", "experts.gate_up_proj")
_DENSE_MLP = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
# what a quantised stage reads a slice of rows at a time: vocabulary-sized, they are rounded to int8 as they are read
_ROW_READ = {"model.embed_tokens.weight", "lm_head.weight"}

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
# Phi-3 keeps its checkpoint's fused tensors: q, k, v rows in `attn_qkv`; gate, then up rows in `ffn_up`
_PHI3_FUSED = {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"}
_PHI3_SPLIT = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight")
# Gemma's four norms a layer: `ffn_norm` is the one before its MLP, `post_attention_norm` the attention output's
_GEMMA_NORMS = {"post_attention_norm.weight": "post_attention_layernorm.weight",
                "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
_GEMMA = ("gemma2", "gemma3")
# llama.cpp's Gemma layer counts of the 27B models, whose attention scale is 1 / sqrt(hidden / heads), not head_dim's
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

# Llama 3.1/3.2 rope scaling as Meta ships it; llama.cpp stores only the per-frequency factors it
# implies (`rope_freqs.weight`), so we recover the parameters and check they reproduce the tensor.
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class GGUFModel:
    """A GGUF model file opened for reading: `config`, `load_state_dict(start, end)`, `tokenizer()`."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        readers = _open_parts(path)
        self.files = split_gguf_parts(path) if len(readers) > 1 else [path]
        self.path = self.files[0]  # the file with the metadata
        self._reader = readers[0]
        self._tensors: dict[str, ReaderTensor] = {t.name: t for reader in readers for t in reader.tensors}
        self._maps = {t.name: reader.file_map for reader in readers for t in reader.tensors}  # each tensor's file map
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

    def tensor_types(self) -> dict[str, tuple[str, int]]:
        """Each tensor's GGML type name and element count, in every file of the model."""
        return {name: (t.tensor_type.name, int(t.n_elements)) for name, t in self._tensors.items()}

    def quantization(self) -> str | None:
        """How the file stores its weights, as llama.cpp names its file types (Q4_K_M, Q8_0, F16): `general.file_type`,
        else the GGML type of most of its weights; None for a file of floats with neither."""
        file_types = {t.value: t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in LlamaFileType}
        file_type = self._metadata("general.file_type")
        if file_type is not None and int(file_type) in file_types:  # else newer than this gguf-py: by its tensors
            return file_types[int(file_type)]
        counts: dict[str, int] = {}
        for kind, elements in self.tensor_types().values():
            counts[kind] = counts.get(kind, 0) + elements
        return max(counts, key=lambda kind: counts[kind]) if counts else None

    def pooling_type(self) -> int | None:
        """llama.cpp's pooling of an embedding model (`<arch>.pooling_type`: 0 none, 1 mean, 2 cls, 3 last, 4 rank);
        None where the file says nothing (a generation model)."""
        value = self._arch("pooling_type")
        return None if value is None else int(value)

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
        if self.architecture == "phi3":
            config.update(self._phi3_config(config))
        if self.architecture in _GEMMA:
            config.update(self._gemma_config(config))
        if self._arch("expert_count"):
            config.update(self._experts_config(config))
        rope_scaling = self._rope_scaling(config)
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        return config

    def _experts_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """A mixture of experts as transformers' config names it: Qwen3-MoE's experts (`expert_feed_forward_length`
        wide, their weights renormalised over the chosen ones unless `expert_weights_norm` says not, as llama.cpp
        reads it); a `llama` file with experts is Mixtral (as wide as `feed_forward_length`)."""
        experts, chosen = int(self._arch("expert_count")), int(self._arch("expert_used_count", required=True))
        if self.architecture == "llama":
            return {"model_type": "mixtral", "num_local_experts": experts, "num_experts_per_tok": chosen}
        if self.architecture != "qwen3moe":
            raise ModelLoadError(f"{self.path}: a {self.architecture} file with experts is not supported; mixtures of "
                                 "experts load from qwen3moe files and llama files with experts (Mixtral)")
        return {"num_experts": experts, "num_experts_per_tok": chosen,
                "moe_intermediate_size": int(self._arch("expert_feed_forward_length", required=True)),
                "norm_topk_prob": bool(self._arch("expert_weights_norm", True))}

    def _phi3_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """What llama.cpp's converter writes of a Phi-3 config besides the common keys: the rotary dims a head
        (Phi-4-mini's partial rotary embedding), the sliding window (0: none, as Phi-4), the original context."""
        values: dict[str, Any] = {}
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        rotary = self._arch("rope.dimension_count")
        if rotary is not None and int(rotary) != head_dim:
            values["partial_rotary_factor"] = int(rotary) / head_dim
        if window := self._arch("attention.sliding_window"):
            values["sliding_window"] = int(window)
        if (original := self._arch("rope.scaling.original_context_length")) is not None:
            values["original_max_position_embeddings"] = int(original)
        return values

    def _gemma_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """What llama.cpp reads of a Gemma 2/3 file besides the common keys, as transformers' config names it: the
        sliding window (none where absent or 0), the logit caps, the sliding layers' pattern and rotary base
        (llama.cpp's fixed 2 or 6, and 10000, where the file names none), and the attention scale, which no key holds:
        llama.cpp takes hidden / heads for the 27B models (by their layer count) and head_dim for the others."""
        heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        big = layers == _GEMMA_27B_LAYERS[self.architecture]
        window = self._arch("attention.sliding_window")
        values: dict[str, Any] = {
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": int(window) if window else None,
            "query_pre_attn_scalar": config["hidden_size"] // heads if big else head_dim,
        }
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if (value := self._arch(cap)) is not None:
                values[cap] = float(value)
        pattern = self._arch("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # one flag a layer (True: sliding)
            values["layer_types"] = ["sliding_attention" if flag else "full_attention" for flag in pattern]
        elif pattern:
            values["sliding_window_pattern"] = int(pattern)
        if self.architecture == "gemma3":
            # llama.cpp's key, then Ollama's converter's
            local = self._arch("rope.freq_base_swa", self._arch("rope.local.freq_base", 10000.0))
            values["rope_local_base_freq"] = float(local)
        return values

    def _rope_scaling(self, config: dict[str, Any]) -> dict[str, Any] | None:
        if "rope_factors_long.weight" in self._tensors:  # Phi-3's longrope, its factors as two tensors
            if "rope_factors_short.weight" not in self._tensors:
                raise ModelLoadError(f"{self.path}: rope_factors_long.weight without rope_factors_short.weight")
            longrope: dict[str, Any] = {
                "rope_type": "longrope", "long_factor": self._read_tensor("rope_factors_long.weight").tolist(),
                "short_factor": self._read_tensor("rope_factors_short.weight").tolist()}
            if (attention := self._arch("rope.scaling.attn_factor")) is not None:
                longrope["attention_factor"] = float(attention)
            return longrope
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

    def lazy_state_dict(self, start: int, end: int, dtype: torch.dtype = torch.float32,
                        groups: LayerGroups | None = None) -> LazyWeights:
        """The same tensors, each read in `dtype` only when it is looked up. With `groups` (`stage_groups`), the
        layers' 4-bit weights are the values of those groups, which the file is not decoded again for, and a layer's
        experts stored in 4-bit groups whole (gate, up and down) are meta tensors: `quantize_layer_int4` makes them
        of the groups without reading values."""
        names = self._stage_names(start, end)
        self._log_slow_types(names)
        readers = {hf: functools.partial(self._read_tensor, gguf_name, dtype) for gguf_name, hf in names.items()}
        if groups is not None:
            for gguf_name, hf in names.items():
                if hf.startswith("model.layers.") and self._grouped_linear(gguf_name, groups.types):
                    readers[hf] = functools.partial(groups.values, int(hf.split(".")[2]), hf, dtype)
        gate, up, both = _GATE_UP_EXPERTS
        for hf in [hf for hf in readers if hf.endswith(gate)]:
            layer = hf.removesuffix(gate)
            stacks = [gguf_name for gguf_name, name in names.items() if name.startswith(layer) and ".experts." in name]
            parts = readers.pop(hf), readers.pop(layer + up)
            readers[layer + both] = functools.partial(_experts_gate_up, *parts)
            if groups is not None and all(self._qtype(name) in groups.types for name in stacks):
                gate_stack, down_stack = (self._shape(next(n for n in stacks if n.endswith(kind)))
                                          for kind in ("ffn_gate_exps.weight", "ffn_down_exps.weight"))
                experts, width, hidden = gate_stack
                readers[layer + both] = functools.partial(torch.empty, (experts, 2 * width, hidden), dtype=dtype,
                                                          device="meta")
                readers[layer + "experts.down_proj"] = functools.partial(torch.empty, down_stack, dtype=dtype,
                                                                         device="meta")
        ends = {gguf_name: hf for gguf_name, hf in names.items() if hf in _ROW_READ}
        return LazyWeights(readers, {hf: self._row_reader(gguf_name, dtype) for gguf_name, hf in ends.items()})

    def _qtype(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(self._tensors[name].tensor_type)

    def _shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, outermost dimension first (as torch has it; GGUF lists the innermost first)."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def _grouped_linear(self, name: str, types: frozenset[GGMLQuantizationType]) -> bool:
        """Whether tensor `name` is a linear's weight [N, K] stored in one of `types`, whose groups the int4 kernels
        take as they are (a stack of experts' weights is read as values too; its groups make `Int4Experts`)."""
        return len(self._tensors[name].shape) == 2 and self._qtype(name) in types

    def _log_slow_types(self, names: dict[str, str]) -> None:
        """One line naming the types of a stage that gguf.quants decodes (in numpy, several times slower)."""
        slow = Counter(qtype.name for name in names if (qtype := self._qtype(name)) not in DECODED_TYPES)
        if slow:
            log.info("%s: tensors stored as %s are decoded by gguf.quants (numpy, slower)", self.path.name,
                     ", ".join(f"{kind} ({count})" for kind, count in sorted(slow.items())))

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

    def stores_groups(self, start: int, end: int, types: frozenset[GGMLQuantizationType] = GROUPED_TYPES) -> bool:
        """Whether any linear weight of layers [start, end) is stored in one of `types` (4-bit types, which every int4
        kernel takes as they are, or also 5-bit ones where ringlet's CPU kernels run: `load_groups`): read from the
        tensors' types, no data. When so, one log line names the quantised types of the others, which are
        dequantised."""
        stored = self._linear_types(start, end)
        grouped = any(qtype in types for qtype in stored)
        others = {qtype.name: count for qtype, count in stored.items()
                  if qtype not in types and qtype not in FLOAT_TYPES}
        if grouped and others:
            log.info("%s: weights of layers %d-%d stored as %s are dequantised (not groups the kernels take)",
                     self.path.name, start, end - 1,
                     ", ".join(f"{kind} ({count})" for kind, count in sorted(others.items())))
        return grouped

    def _linear_types(self, start: int, end: int) -> Counter[GGMLQuantizationType]:
        return Counter(GGMLQuantizationType(tensor.tensor_type) for i in range(start, end)
                       for g in self._layer_tensor_names() if g.endswith(".weight")
                       and (tensor := self._tensors.get(f"blk.{i}.{g}")) is not None and len(tensor.shape) in (2, 3))

    def stage_groups(self, start: int, end: int, cache: RepackCache | None = None,
                     types: frozenset[GGMLQuantizationType] = GROUPED_TYPES) -> LayerGroups | None:
        """The groups of layers [start, end) stored in `types` for an int4 stage, one layer at a time (see
        `LayerGroups`), or None where the file stores none of them so."""
        return LayerGroups(self, cache, types) if self.stores_groups(start, end, types) else None

    def load_groups(self, start: int, end: int, cache: RepackCache | None = None,
                    types: frozenset[GGMLQuantizationType] = GROUPED_TYPES) -> dict[str, GroupQuantized]:
        """The weights of layers [start, end) stored in `types` (Q4_0/Q4_1/Q4_K; Q5_0/Q5_1/Q5_K where asked) as their
        own codes and per-32 scales/offsets (HF names and layout), for int4 kernels that take them as they are;
        weights of other types are left out. With `cache`, each layer's are read from it where it has them, and
        written to it where not."""
        groups = {}
        for i in range(start, end):
            names = {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in self._layer_tensor_names().items()
                     if f"blk.{i}.{g}" in self._tensors and self._qtype(f"blk.{i}.{g}") in types}
            if not names:
                continue
            stored = {name: self._qtype(name).name for name in names}
            layer = cache.read(f"blk.{i}", stored) if cache is not None else None
            if layer is None:
                layer = {name: self._read_groups(name) for name in names}
                if cache is not None:
                    cache.write(f"blk.{i}", stored, layer)
            groups.update({names[name]: g for name, g in layer.items()})
        return groups

    def _read_groups(self, name: str) -> GroupQuantized:
        """A weight's groups, [N, K]; a stack of experts' weights [E, N, K] as [E * N, K]."""
        tensor = self._tensors[name]
        columns = int(tensor.shape[0])
        rows = int(np.prod(tensor.shape.tolist())) // columns
        groups = decode_groups(tensor.data, self._qtype(name), (rows, columns))
        if (heads := self._permuted_heads(name)) is not None:
            groups = GroupQuantized(unpermute_qk(groups.codes, heads), unpermute_qk(groups.scale, heads),
                                    unpermute_qk(groups.offset, heads), groups.group_size, groups.bits)
        self._release(name)
        return groups

    def _row_reader(self, name: str, dtype: torch.dtype) -> RowReader:
        """The rows of a 2-d tensor that llama.cpp's converter did not permute (the embedding, the lm_head)."""
        rows, columns = (int(d) for d in reversed(self._tensors[name].shape.tolist()))
        return RowReader(rows, columns, functools.partial(self._read_rows, name, dtype))

    def _read_rows(self, name: str, dtype: torch.dtype, first: int, end: int) -> torch.Tensor:
        tensor = self._tensors[name]
        columns = int(tensor.shape[0])
        data = np.asarray(tensor.data).reshape(int(tensor.shape[1]), -1)  # a row's bytes a line
        values = self._dequantize(name, data[first:end], (end - first, columns), dtype)
        row_bytes = data.shape[1] * data.itemsize
        self._release(name, first * row_bytes, (end - first) * row_bytes)
        return values

    def _permuted_heads(self, name: str) -> int | None:
        """The head count a q/k tensor's rows were permuted over by llama.cpp's converter; None for the others."""
        if self.architecture in _PERMUTED_QK and (".attn_q." in name or ".attn_k." in name):
            return int(self.config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"])
        return None

    def _release(self, name: str, skip: int = 0, length: int | None = None) -> None:
        """Drop the file's pages of a tensor (or of its bytes [skip, skip + length)) decoded into memory of its own
        from this process's resident memory (they stay in the page cache): a mapped page once read stays resident,
        and a load would otherwise grow by the whole file on top of the weights it keeps. Where the map or madvise
        is missing, the pages just stay."""
        mapped = getattr(self._maps[name], "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        tensor = self._tensors[name]
        start = int(tensor.data_offset) + skip
        end = start + (int(tensor.n_bytes) - skip if length is None else length)
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)

    def _layer_tensor_names(self) -> dict[str, str]:
        names = dict(_LAYER_TENSORS)
        if self.config["model_type"] == "phi3":
            names = {g: h for g, h in names.items() if g not in _PHI3_SPLIT} | _PHI3_FUSED
        if self.config["attention_bias"]:
            names.update(_BIAS_TENSORS)
        if self.config["model_type"] in ("qwen3", "gemma3_text", "qwen3_moe"):
            names.update(_QK_NORM_TENSORS)
        if self.config["model_type"] in ("qwen3_moe", "mixtral"):  # every layer sparse, as llama.cpp builds them
            mlp = "block_sparse_moe." if self.config["model_type"] == "mixtral" else "mlp."
            names = {g: h for g, h in names.items() if g not in _DENSE_MLP}
            names.update({g: mlp + h for g, h in _EXPERT_TENSORS.items()})
        if self.architecture in _GEMMA:
            names.update(_GEMMA_NORMS)
        return names

    def _dequantize(self, name: str, data: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype,
                    row_order: torch.Tensor | None = None) -> torch.Tensor:
        """`gguf_quants.dequantize` of (part of) tensor `name`, its failures a ModelLoadError naming the tensor."""
        qtype = self._qtype(name)
        try:
            return dequantize(data, qtype, shape, dtype, row_order=row_order)
        except NotImplementedError as e:  # a GGML type without a decoder
            raise ModelLoadError(
                f"{self.path}: tensor {name} has GGML type {qtype.name}, which cannot be dequantised"
            ) from e
        except ValueError as e:
            raise ModelLoadError(f"{self.path}: tensor {name}: {e}") from e

    def _read_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor's values in `dtype`, in HF layout (row-major [out, in], q/k un-permuted)."""
        tensor = self._tensors[name]
        # GGUF lists dimensions innermost first; torch wants them outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        heads = self._permuted_heads(name)
        order = None if heads is None or len(shape) != 2 else unpermute_qk(torch.arange(shape[0]), heads).argsort()
        if self.architecture in _GEMMA and name.endswith("norm.weight"):
            # llama.cpp's converter stores a Gemma norm's scale, 1 + weight; the model adds the 1 itself (in fp32)
            values = (self._dequantize(name, tensor.data, shape, torch.float32) - 1).to(dtype)
            self._release(name)
            return values
        values = self._dequantize(name, tensor.data, shape, dtype, order)
        if heads is not None and order is None:
            values = unpermute_qk(values, heads)
        self._release(name)  # the values are a tensor of their own, never a view of the map
        return values

    # ---- tokenizer ------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf_file(self.path, gguf_metadata(self._reader))


class LayerGroups:
    """A stage's groups (4-bit, and 5-bit where `types` has them), one layer at a time: read once (from the repack
    cache, else decoded from the file) for both the layer's float weights, which a linear fusing them with wider
    tensors needs, and its int4 linears."""

    def __init__(self, model: GGUFModel, cache: RepackCache | None,
                 types: frozenset[GGMLQuantizationType] = GROUPED_TYPES) -> None:
        self._model, self._cache = model, cache
        self.types = types  # the GGML types kept as their codes
        self._index = -1
        self._groups: dict[str, GroupQuantized] = {}

    def stores_groups(self, start: int, end: int) -> bool:
        return any(qtype in self.types for qtype in self._model._linear_types(start, end))

    def load_groups(self, start: int, end: int) -> dict[str, GroupQuantized]:
        """HF weight name -> groups, of layers [start, end). A layer's are asked for here once its values were read
        (`values`), to make its int4 linears: they are not kept after."""
        if end - start == 1:
            groups = self.of_layer(start)
            self._groups, self._index = {}, -1
            return groups
        return self._model.load_groups(start, end, self._cache, self.types)

    def of_layer(self, index: int) -> dict[str, GroupQuantized]:
        """HF weight name -> groups, of decoder layer `index` (global)."""
        if index != self._index:
            self._groups = {}  # the previous layer's go before the next are read
            self._groups, self._index = self._model.load_groups(index, index + 1, self._cache, self.types), index
        return self._groups

    def values(self, index: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The weight's values; a meta tensor of its shape where every part of the fused linear it belongs to has
        groups, as the int4 linear made of them reads no values (`quantize_layer_int4`)."""
        groups = self.of_layer(index)
        if all(part in groups for part in fused_with(name)):
            return torch.empty(groups[name].codes.shape, dtype=dtype, device="meta")
        return dequantize_groups(groups[name], dtype)


def _experts_gate_up(gate: Callable[[], torch.Tensor], up: Callable[[], torch.Tensor]) -> torch.Tensor:
    """[E, 2I, H] from stacked gate and up [E, I, H]: each expert's gate rows, then its up rows."""
    return torch.cat((gate(), up()), dim=1)


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows (interleaved rotary pairs -> HF's rotate-half halves).

    llama.cpp: w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2); this is its inverse,
    written exactly as transformers' LlamaTensorProcessor._reverse_permute_weights does it.
    """
    half_head = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half_head, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


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


def _open_parts(path: Path) -> list[_Reader]:
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


class _Reader(GGUFReader):
    """gguf-py's reader, parsing a plain array over the file's map (`file_map`). It slices the map a few times for
    every metadata value, hundreds of thousands of times for a vocabulary of 49,152 tokens and its merges, and a slice
    of a `numpy.memmap` runs numpy's Python code (`__array_finalize__`) where a plain array's does not: that code
    was most of the seconds gguf-py took to open the embedded model (`python -m cProfile` of `GGUFReader(path)`)."""

    file_map: np.memmap
    _plain: np.ndarray

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.memmap) -> None:
        self.file_map, self._plain = value, value.view(np.ndarray)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int],
                                                                       list[GGUFValueType]]:
        """gguf-py's parts of a metadata value, with an array of strings or numbers read in one pass: the same parts
        (a length and the bytes of each string, a one-element view of each number), without gguf-py's call, dtype
        and byte-order view for every element of a vocabulary."""
        if self.byte_order != "I" or raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._plain[orig_offs:orig_offs + 4].view(np.uint32)
        count = self._plain[orig_offs + 4:orig_offs + 12].view(np.uint64)
        scalar = self.gguf_scalar_to_np.get(GGUFValueType(int(item_type[0])))
        if scalar is None and item_type[0] != GGUFValueType.STRING:  # arrays of arrays: gguf-py's walk
            return super()._get_field_parts(orig_offs, raw_type)
        parts: list[np.ndarray] = [item_type, count]
        offs, n = orig_offs + 12, int(count[0])
        if scalar is not None:
            values = self._plain[offs:offs + n * np.dtype(scalar).itemsize].view(scalar)
            parts += [values[i:i + 1] for i in range(n)]
            offs += values.nbytes
            indices = list(range(2, 2 + n))
        else:
            plain = self._plain
            for _ in range(n):
                length = plain[offs:offs + 8].view(np.uint64)
                end = offs + 8 + int(length[0])
                parts += (length, plain[offs + 8:end])
                offs = end
            indices = list(range(3, 3 + 2 * n, 2))
        types = [GGUFValueType.ARRAY] + ([GGUFValueType(int(item_type[0]))] if n else [])
        return offs - orig_offs, parts, indices, types


def _open_reader(path: Path) -> _Reader:
    """GGUFReader, with every way a bad file fails turned into one ModelLoadError that names it."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = _Reader(path)
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
