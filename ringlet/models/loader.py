"""Resolve a model reference (embedded name, HF directory, GGUF file) and load one stage of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ringlet.models import safetensors_loader
from ringlet.models.config import ModelArgs
from ringlet.models.embedded import EMBEDDED_MODEL_ID, embedded_model_path
from ringlet.models.ollama import find_ollama_model, ollama_models_dir
from ringlet.models.quant import GroupQuantized
from ringlet.models.registry import build_stage, model_args
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.errors import ModelLoadError

EMBEDDED_ALIASES = {EMBEDDED_MODEL_ID.lower(), "default", "smollm2-135m", "smollm2-135m-instruct",
                    "huggingfacetb/smollm2-135m-instruct"}


@dataclass
class LoadedStage:
    args: ModelArgs
    model: nn.Module
    tokenizer: Tokenizer
    start: int
    end: int
    # the file's own 4-bit weights by Hugging Face name (GGUF Q4_0/Q4_1), when asked for: int4 kernels use them
    groups: dict[str, GroupQuantized] = field(default_factory=dict)


def resolve_model_path(ref: str | Path | None) -> Path:
    """A local path, then a model in the store (`ringlet pull`), then one pulled with Ollama (`llama3.2:1b`), then
    the embedded model's names."""
    if ref is None:
        return embedded_model_path()
    path = Path(ref).expanduser()
    if path.exists():
        return path
    from ringlet.models.store import find_local, ringlet_home

    # the store first: a pulled full-precision HuggingFaceTB/SmolLM2-135M-Instruct beats the embedded Q4_1 file
    if (stored := find_local(str(ref))) is not None:
        return stored
    if (pulled := find_ollama_model(str(ref))) is not None:
        return pulled.path
    if str(ref).lower() in EMBEDDED_ALIASES:
        return embedded_model_path()
    fetch = f"`ringlet pull {ref}` downloads it" if "/" in str(ref) else f"`ollama pull {ref}` fetches it"
    raise ModelLoadError(
        f"model {str(ref)!r} not found: not a local path, not in the store ({ringlet_home() / 'models'}) and not "
        f"pulled with Ollama ({ollama_models_dir()}); {fetch}, `ringlet models` lists what is there, "
        f"or use {EMBEDDED_MODEL_ID!r} (the embedded model)"
    )


def read_model_config(ref: str | Path | None) -> tuple[Path, ModelArgs]:
    path = resolve_model_path(ref)
    if path.is_dir():
        return path, model_args(safetensors_loader.read_config(path))
    return path, model_args(_open_gguf(path).config)


def load_stage(
    ref: str | Path | None, start: int = 0, end: int | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", keep_groups: bool = False,
) -> LoadedStage:
    """Layers [start, end) of a model; `keep_groups` also keeps a GGUF file's 4-bit weights as they are."""
    path = resolve_model_path(ref)
    groups: dict[str, GroupQuantized] = {}
    if path.is_dir():
        args = model_args(safetensors_loader.read_config(path))
        end = args.num_hidden_layers if end is None else end
        weights = safetensors_loader.load_weights(path, start, end, args.num_hidden_layers, args.tie_word_embeddings)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        gguf = _open_gguf(path)
        args = model_args(gguf.config)
        end = args.num_hidden_layers if end is None else end
        weights = gguf.load_state_dict(start, end)
        tokenizer = gguf.tokenizer()
        if keep_groups:
            groups = gguf.load_groups(start, end)
    model = build_stage(args, start, end, weights=weights, dtype=dtype, device=device)
    return LoadedStage(args, model, tokenizer, start, end, groups)


def _open_gguf(path: Path):
    from ringlet.models.gguf_loader import GGUFModel, is_gguf

    if not is_gguf(path):  # by its first bytes: Ollama's blobs have no suffix
        raise ModelLoadError(f"{path} is neither a model directory nor a GGUF file")
    return GGUFModel.open(path)
