"""What makes a model an embedding model: the sentence-transformers files beside its weights.

A sentence-transformers directory lists its modules in `modules.json`: the transformer, then a `Pooling` module
(its folder, usually `1_Pooling/`, holds `config.json` with one `pooling_mode_*` flag set) and often a `Normalize`
module (L2 normalisation). Qwen3-Embedding ships pooling by the last token and a Normalize module; many BERT-era
models pool by the mean. A directory without a Pooling module is a generation model. A GGUF file of an embedding
model names its pooling in its metadata (`gguf_pooling`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ringlet.shared.errors import ModelLoadError

PoolingMode = Literal["lasttoken", "mean", "cls"]
POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
# the Pooling module's flags, as its config.json names them; the others (max, weighted mean) are not supported
_FLAGS: dict[str, PoolingMode] = {"pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_tokens": "mean",
                                  "pooling_mode_cls_token": "cls"}
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class Pooling:
    """How an embedding model turns its final hidden states [L, H] into one vector."""

    mode: PoolingMode
    normalize: bool


def read_pooling(model_dir: Path) -> Pooling | None:
    """The pooling of a sentence-transformers model directory; None for a directory that has none (a generation
    model) or for a model file (GGUF). Raises ModelLoadError for pooling files ringlet cannot follow."""
    modules_file = model_dir / "modules.json"
    if not model_dir.is_dir() or not modules_file.is_file():
        return None
    modules = _json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{modules_file} is not a list of modules; re-download the model")
    pooling_modules = [m for m in modules if m.get("type") == POOLING_MODULE]
    if not pooling_modules:
        return None
    config_file = model_dir / str(pooling_modules[0].get("path", "")) / "config.json"
    config = _json(config_file)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} is not a JSON object; re-download the model")
    modes = [mode for flag, mode in _FLAGS.items() if config.get(flag)]
    others = [flag for flag in _UNSUPPORTED if config.get(flag)]
    if others or len(modes) != 1:
        raise ModelLoadError(f"{config_file} asks for pooling {', '.join(others + list(modes)) or 'by nothing'}; "
                             "ringlet pools by exactly one of the last token, the mean of the tokens or the first "
                             "(cls) token")
    return Pooling(mode=modes[0], normalize=any(m.get("type") == NORMALIZE_MODULE for m in modules))


# llama.cpp's pooling types, as a GGUF file of an embedding model names its pooling (convert_hf_to_gguf.py writes
# them from the sentence-transformers files); it normalises the pooled vectors, as Ollama's /api/embed does
GGUF_POOLING: dict[int, PoolingMode] = {1: "mean", 2: "cls", 3: "lasttoken"}


def gguf_pooling(pooling_type: int | None, path: Path) -> Pooling | None:
    """The pooling a GGUF file names (`GGUFModel.pooling_type`); None for none (a generation model)."""
    if pooling_type in (None, 0):
        return None
    if pooling_type not in GGUF_POOLING:
        raise ModelLoadError(f"{path}: pooling type {pooling_type} (4 is a reranker's) is not one ringlet embeds "
                             "with; it pools by the mean (1), the first token (2) or the last token (3)")
    return Pooling(mode=GGUF_POOLING[pooling_type], normalize=True)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; the model's modules.json names it (re-download the model)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); re-download the model") from None
