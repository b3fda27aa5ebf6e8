"""Hugging Face model directories: config.json plus one or several safetensors files.

Only the tensors of the requested layer range are read, and only the files that hold them are opened. A quantised
checkpoint's linears (AWQ, GPTQ, fp8: `hf_quant`) are read as their dequantised weights, under the plain weight's
name, and as their own codes (`quantized_linears`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ringlet.models.hf_quant import QuantizedLinears, quant_scheme
from ringlet.models.weights import LazyWeights, RowReader
from ringlet.shared.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir} has no config.json; is it a Hugging Face model directory?") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-download the model") from None


def tensor_in_range(name: str, start: int, end: int, num_layers: int, tied: bool) -> bool:
    """Whether a stage owning layers [start, end) needs this tensor."""
    if m := _LAYER.match(name):
        return start <= int(m.group(1)) < end
    if name == "model.embed_tokens.weight":
        return start == 0 or (tied and end == num_layers)  # a tied last stage uses it as lm_head
    if name in ("model.norm.weight", "lm_head.weight"):
        return end == num_layers
    return False  # e.g. rotary inv_freq buffers saved by old checkpoints


def weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or by listing the single file."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e})") from None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no .safetensors files")
    mapping: dict[str, str] = {}
    for f in files:
        with _open(f) as handle:
            mapping.update(dict.fromkeys(handle.keys(), f.name))
    return mapping


def quantized_linears(model_dir: Path, config: dict[str, Any]) -> QuantizedLinears | None:
    """The checkpoint's quantised linears, when its config has a quantization_config (None otherwise)."""
    scheme = quant_scheme(config)
    if scheme is None:
        if config.get("quantization_config") is not None:
            raise ModelLoadError("the checkpoint's weights are quantised by MLX (a quantization_config without "
                                 "quant_method), which only the mlx engine reads; use the mlx engine or the model's "
                                 "bf16 checkpoint")
        return None
    if scheme.method == "mxfp4":  # experts only, whose blocks and scales the model reads as they are
        return None
    files = weight_map(model_dir)
    return QuantizedLinears(scheme, files, lambda name: _read(model_dir / files[name], name, None))


def lazy_weights(model_dir: Path, start: int, end: int, num_layers: int, tied: bool,
                 dtype: torch.dtype | None = None, quantized: QuantizedLinears | None = None) -> LazyWeights:
    """The stage's tensors, each read (and converted to `dtype`) only when it is looked up; the `quantized` linears
    dequantised, in place of their packed tensors."""
    files = weight_map(model_dir)
    stored = _stored_names(files)
    wanted = {n: files[stored[n]] for n in stored if tensor_in_range(n, start, end, num_layers, tied)}
    readers = {name: functools.partial(_read, model_dir / file, stored[name], dtype) for name, file in wanted.items()}
    if quantized is not None:
        for name, parts in quantized.parts.items():
            if tensor_in_range(name, start, end, num_layers, tied):
                for part in parts:
                    readers.pop(part, None)
                readers[name] = functools.partial(quantized.dense, name, dtype)
    ends = {name: file for name, file in wanted.items()
            if name in ("model.embed_tokens.weight", "lm_head.weight") and name in readers}
    return LazyWeights(readers, {name: _row_reader(model_dir / file, stored[name], dtype)
                                 for name, file in ends.items()})


_BACKBONE = ("embed_tokens.", "layers.", "norm.")


def named_weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name as the model names it (`model.layers.0....`, whatever the file calls it) -> file name."""
    files = weight_map(model_dir)
    return {name: files[stored] for name, stored in _stored_names(files).items()}


def _stored_names(files: dict[str, str]) -> dict[str, str]:
    """Tensor name as the model names it -> as the file stores it. A checkpoint of the bare backbone (as
    sentence-transformers saves Qwen3-Embedding: `embed_tokens.weight`, `layers.0....`, `norm.weight`, no lm_head)
    stores the names without their `model.` prefix."""
    flat = not any(name.startswith("model.") for name in files)
    return {("model." + name if flat and name.startswith(_BACKBONE) else name): name for name in files}


def tensor_shapes(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, safetensors dtype name: F32, BF16, U32, ...), from the files' headers alone."""
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map(model_dir).items():
        by_file.setdefault(file, []).append(name)
    shapes = {}
    for file, names in by_file.items():
        with _open(model_dir / file) as handle:
            for name in names:
                tensor = handle.get_slice(name)
                shapes[name] = (list(tensor.get_shape()), str(tensor.get_dtype()))
    return shapes


def _row_reader(path: Path, name: str, dtype: torch.dtype | None) -> RowReader:
    """A vocabulary-sized tensor's rows, read a slice at a time (a quantised stage rounds them to int8 so)."""
    with _open(path) as handle:
        rows, columns = handle.get_slice(name).get_shape()

    def read(first: int, end: int) -> torch.Tensor:
        with _open(path) as handle:
            try:
                part = handle.get_slice(name)[first:end]
            except SafetensorError as e:
                raise ModelLoadError(f"cannot read tensor {name} from {path}: {e}; the file may be truncated") from None
        return part if dtype is None else part.to(dtype)

    return RowReader(rows, columns, read)


def _read(path: Path, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    with _open(path) as handle:
        try:
            tensor = handle.get_tensor(name)
        except SafetensorError as e:
            raise ModelLoadError(f"cannot read tensor {name} from {path}: {e}; the file may be truncated") from None
    # integer tensors are packed codes (MXFP4 experts' blocks and scales), kept as stored
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _open(path: Path):
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; re-download the model")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
