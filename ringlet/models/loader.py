"""Resolve a model reference (embedded name, HF directory, GGUF file) and load one stage of it."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from ringlet.models import safetensors_loader
from ringlet.models.config import ModelArgs
from ringlet.models.embedded import EMBEDDED_MODEL_ID, embedded_model_path
from ringlet.models.fp8 import runs_fp8, use_fp8_layer
from ringlet.models.gguf_quants import GROUPED5_TYPES, GROUPED_TYPES
from ringlet.models.ollama import find_ollama_model, library_model, ollama_models_dir
from ringlet.models.pooling import Pooling, gguf_pooling, read_pooling
from ringlet.models.quant import GROUP_SIZE, cpu_tiles, quantize_int8, quantize_layer_int4
from ringlet.models.quant_cuda import CUDA_GROUP_SIZE
from ringlet.models.registry import build_stage, model_args
from ringlet.models.repack_cache import RepackCache
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.errors import ModelLoadError

if TYPE_CHECKING:
    from ringlet.models.llama import Transformer

EMBEDDED_ALIASES = {EMBEDDED_MODEL_ID.lower(), "default", "smollm2-135m", "smollm2-135m-instruct",
                    "huggingfacetb/smollm2-135m-instruct"}


# weight-only quantisation of a stage's linears while it loads: int8, int4, or "int4 where stored" (int4 where the
# file keeps the stage's linears in 4-bit groups, int8 otherwise)
Quantization = Literal["int8", "int4", "int4 where stored"]


@dataclass
class LoadedStage:
    args: ModelArgs
    model: nn.Module
    tokenizer: Tokenizer
    start: int
    end: int
    quantized: Literal["int8", "int4"] | None = None  # what the linears were quantised to while loading
    pooling: Pooling | None = None  # an embedding model's (`models/pooling.py`); None: a generation model


# called after each layer a stage loads: (layers loaded, layers of the stage, bytes the loaded layers keep), and
# once more when the whole stage is loaded, with every byte it keeps
LoadProgress = Callable[[int, int, int], None]
_progress_listeners: list[LoadProgress] = []


@contextlib.contextmanager
def reporting_load_progress(listener: LoadProgress) -> Iterator[None]:
    """Within the block, every stage this process loads calls `listener` as each of its layers is loaded."""
    _progress_listeners.append(listener)
    try:
        yield
    finally:
        _progress_listeners.remove(listener)


def gguf_embedding_kept_int8(path: Path) -> bool:
    """Whether an int4 stage of the GGUF model keeps its token embedding as int8 rows on CUDA: where the file keeps
    some linears in 4-bit groups (the stage keeps the file's mix) and the embedding in more bits than 4, which
    rounding to 4-bit groups would lose. Read from the tensors' types, no data."""
    four_bit = {kind.name for kind in GROUPED_TYPES}
    tensors = gguf_facts(path).tensor_types
    embedding = tensors.get("token_embd.weight")
    four_bit_linears = any(kind in four_bit for name, (kind, _) in tensors.items()
                           if name.startswith("blk.") and name.endswith(".weight"))
    return four_bit_linears and embedding is not None and embedding[0] not in four_bit


def names_a_path(ref: str) -> bool:
    """Whether `ref` can only be a path (absolute, relative to here or home, or a .gguf file), never a model name."""
    return ref.startswith(("/", "./", "../", "~")) or ref.endswith(".gguf")


def resolve_model_path(ref: str | Path | None, aliases: bool = True) -> Path:
    """A local path, then a model in the store (`ringlet pull`), then one pulled with Ollama (`llama3.2:1b`), then
    the embedded model's names, then a second name made by a copy (`aliases`), then an Ollama library name pulled
    into the store (`qwen3:8b`)."""
    if ref is None:
        return embedded_model_path()
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if isinstance(ref, Path) or names_a_path(ref):
        raise ModelLoadError(f"{ref}: no such file or folder (a model is a GGUF file, a Hugging Face model folder, "
                             "or a name that `ringlet models` lists)")
    from ringlet.models.aliases import ModelAliases
    from ringlet.models.store import find_local, ringlet_home

    # the store first: a pulled full-precision HuggingFaceTB/SmolLM2-135M-Instruct beats the embedded Q4_1 file
    if (stored := find_local(str(ref))) is not None:
        return stored
    if (pulled := find_ollama_model(str(ref))) is not None:
        return pulled.path
    if str(ref).lower() in EMBEDDED_ALIASES:
        return embedded_model_path()
    if aliases and (alias := ModelAliases().get(str(ref))) is not None:
        return resolve_model_path(alias.target, aliases=False)
    library = library_model(str(ref))
    if library is not None and (stored := find_local(library.ref)) is not None:
        return stored
    if library is not None:
        fetch = f"`ringlet pull {ref}` downloads it ({library.repo_id}, {library.quant})"
    else:
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
    return path, gguf_facts(path).args


@dataclass(frozen=True)
class GGUFFacts:
    """What placement reads of a GGUF model: its configuration, and each tensor's GGML type name and size."""

    args: ModelArgs
    tensor_types: Mapping[str, tuple[str, int]]
    quantization: str | None = None  # llama.cpp's name of the file's type (Q4_K_M)


def file_version(path: Path) -> tuple[Path, int, int]:
    """(resolved path, size, modification time in ns): a key that changes when the file is written again."""
    stat = path.stat()
    return path.resolve(), stat.st_size, stat.st_mtime_ns


def gguf_facts(path: Path) -> GGUFFacts:
    """The facts of the GGUF model at `path`, read once a process for each version of the file: opening it parses
    every entry of the vocabulary into arrays of its own."""
    return _gguf_facts(*file_version(path))


@functools.lru_cache(maxsize=16)
def _gguf_facts(path: Path, size: int, mtime_ns: int) -> GGUFFacts:
    gguf = _open_gguf(path)
    return GGUFFacts(model_args(gguf.config), MappingProxyType(gguf.tensor_types()), gguf.quantization())


def load_stage(
    ref: str | Path | None, start: int = 0, end: int | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", quantize: Quantization | None = None,
    sharded: bool = False, runs_here: bool = True,
) -> LoadedStage:
    """Layers [start, end) of a model, read one layer at a time: each is converted to `dtype` (and with `quantize`, its
    linears quantised, a GGUF file's 4-bit (or 5-bit) groups kept as they are) before the next is read, so the load
    never holds the stage in fp32 nor twice. Quantised stages have an int8 embedding and lm_head, rounded as they are
    read (an int4 stage on CUDA: the embedding in 4-bit groups unless it is the lm_head too).
    `sharded`: this process is one rank of the stage's tensor-parallel group (torch.distributed's default group):
    each layer is cut to the rank's share as it is read, and of the embedding and lm_head only its vocabulary rows
    are read (`tensor_parallel.py`); the weights stay in `dtype`. `runs_here`: the stage runs on `device` (not moved
    after loading), so a CPU stage may keep a file's 5-bit codes for ringlet's kernels (`cpu_tiles`)."""
    if sharded and quantize is not None:
        raise ModelLoadError(f"tensor parallelism splits bf16, fp16 or fp32 weights, not {quantize} ones; load at "
                             "--precision bf16 (or fp16, fp32)")
    path = resolve_model_path(ref)
    stored = None  # a quantised checkpoint's linears (AWQ, GPTQ, fp8)
    pooling = read_pooling(path)
    if path.is_dir():
        config = safetensors_loader.read_config(path)
        args = model_args(config)
        if pooling is not None and "lm_head.weight" not in safetensors_loader.weight_map(path):
            # an embedding model's checkpoint without a head (Qwen3-Embedding-8B says it is untied but ships none):
            # its logits are never used, so the embedding stands in as the tied head
            args = dataclasses.replace(args, tie_word_embeddings=True)
        end = args.num_hidden_layers if end is None else end
        stored = safetensors_loader.quantized_linears(path, config)
        weights = safetensors_loader.lazy_weights(path, start, end, args.num_hidden_layers, args.tie_word_embeddings,
                                                  dtype, stored)
        tokenizer = Tokenizer.from_hf_dir(path)
        gguf = None
    else:
        gguf = _open_gguf(path)
        args = model_args(gguf.config)
        pooling = gguf_pooling(gguf.pooling_type(), path)
        end = args.num_hidden_layers if end is None else end
        # an int4 stage reads the file's 4-bit groups once a layer, from the repack cache where it holds them
        types = GROUPED_TYPES | GROUPED5_TYPES if runs_here and cpu_tiles(device, dtype) else GROUPED_TYPES
        gguf_groups = (gguf.stage_groups(start, end, RepackCache.for_files(gguf.files), types)
                       if quantize in ("int4", "int4 where stored") else None)
        weights = gguf.lazy_state_dict(start, end, dtype, gguf_groups)
        tokenizer = gguf.tokenizer()
    grouped = gguf_groups if gguf is not None else stored  # what may keep the linears in 4-bit groups
    file_groups = grouped is not None and quantize in ("int4", "int4 where stored") and grouped.stores_groups(start, end)
    on_cuda = torch.device(device).type == "cuda"  # int4 there rounds the embedding to 4 bits as well
    # unless the file keeps it in more bits beside 4-bit linears
    int4_embedding = on_cuda and not (gguf is not None and file_groups and gguf_embedding_kept_int8(path))
    group_size = (stored.group_size if stored is not None and stored.scheme.grouped
                  else CUDA_GROUP_SIZE if on_cuda else GROUP_SIZE)
    quantized: Literal["int8", "int4"] | None = (
        "int4" if quantize == "int4" or file_groups else "int8" if quantize is not None else None)
    keeps_fp8 = stored is not None and quantized is None and runs_fp8(device)

    kept = 0
    read: Mapping[str, torch.Tensor] = weights  # what the layers are built from
    if sharded:
        import torch.distributed as dist

        from ringlet.models import tensor_parallel

        tensor_parallel.check_shardable(args, dist.get_world_size())  # the default group: the stage's ranks
        keeps_fp8 = False  # the checkpoint's fp8 linears are read as `dtype`, then split
        read = tensor_parallel.ends_deferred(weights)

    def finish_layer(layer: nn.Module, index: int) -> None:
        nonlocal kept
        if sharded:
            tensor_parallel.shard_layer(layer, None)
        if quantized == "int4":
            source = grouped.load_groups(index, index + 1) if grouped is not None and file_groups else {}
            quantize_layer_int4(layer, index, dtype, source, file_groups=file_groups, group_size=group_size,
                                device=device)
            del source  # before the memory it leaves is given back
        elif quantized == "int8":
            quantize_int8(layer, dtype)
        elif keeps_fp8:
            assert stored is not None
            use_fp8_layer(layer, index, dtype, stored.load_fp8(index, index + 1, device))
        kept += sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
        _return_freed_memory()
        for listener in _progress_listeners:
            listener(index + 1 - start, end - start, kept)

    model = build_stage(args, start, end, weights=read, dtype=dtype, device=device, finish_layer=finish_layer,
                        int8_ends=quantized is not None, int4_embedding=quantized == "int4" and int4_embedding)
    if sharded:
        tensor_parallel.shard_ends(cast("Transformer", model), None, weights, dtype, device)
    _return_freed_memory()
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for listener in _progress_listeners:  # the embedding, the lm_head and the final norm loaded too
        listener(end - start, end - start, held)
    return LoadedStage(args, model, tokenizer, start, end, quantized, pooling=pooling)


def _return_freed_memory() -> None:
    """Give the memory a finished layer's conversions freed back to the system. glibc keeps freed blocks under 32 MB
    in its heap, where the layers converted after them scatter what they keep: loading an 8B Q4_K_M file left 0.9 GB
    resident beyond its weights (measured with /proc/self/statm before and after `malloc_trim` at the end of
    `load_torch_stage`). Elsewhere than glibc, nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _open_gguf(path: Path):
    from ringlet.models.gguf_loader import GGUFModel, is_gguf

    if not is_gguf(path):  # by its first bytes: Ollama's blobs have no suffix
        raise ModelLoadError(f"{path} is neither a model directory nor a GGUF file")
    return GGUFModel.open(path)
