"""Hugging Face model directories: config.json plus one or several safetensors files.

Only the tensors of the requested layer range are read, and only the files that hold them are opened.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ringlet.models.weights import LazyWeights
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


def lazy_weights(model_dir: Path, start: int, end: int, num_layers: int, tied: bool,
                 dtype: torch.dtype | None = None) -> LazyWeights:
    """The stage's tensors, each read (and converted to `dtype`) only when it is looked up."""
    wanted = {n: f for n, f in weight_map(model_dir).items() if tensor_in_range(n, start, end, num_layers, tied)}
    return LazyWeights({name: functools.partial(_read, model_dir / file, name, dtype) for name, file in wanted.items()})


def _read(path: Path, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    with _open(path) as handle:
        try:
            tensor = handle.get_tensor(name)
        except SafetensorError as e:
            raise ModelLoadError(f"cannot read tensor {name} from {path}: {e}; the file may be truncated") from None
    return tensor if dtype is None else tensor.to(dtype)


def _open(path: Path):
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; re-download the model")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
