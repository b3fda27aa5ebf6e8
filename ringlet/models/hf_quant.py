"""Quantised Hugging Face checkpoints: which `quantization_config`s ringlet reads, and their linears unpacked.

- AWQ (GEMM layout) and GPTQ: 4-bit codes with a scale and zero point per group of inputs, unpacked into
  `GroupQuantized` (w = codes * scale + offset, offset = -zero * scale), which the int4 kernels run as they are.
- fp8 (compressed-tensors `float-quantized`, or Hugging Face's `fp8` with 128x128 blocks): `Fp8Weight`.
- MXFP4, gpt_oss's experts only: e2m1 codes with a power-of-two scale per 32 weights, which the model reads itself
  (`gpt_oss.Mxfp4Experts`); its other tensors are plain.
Every other method is refused by name: read as plain weights it would give wrong answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from ringlet.models.fp8 import Fp8Weight
from ringlet.models.quant import GroupQuantized
from ringlet.shared.errors import ModelLoadError

SUPPORTED = ("AWQ (4-bit, GEMM layout), GPTQ (4-bit, groups of 32, 64 or 128), fp8 e4m3 (compressed-tensors "
             "float-quantized, or quant_method fp8), mxfp4 (gpt_oss's experts)")
GROUP_SIZES = (32, 64, 128)  # those the int4 kernels take
# nibble i of an AWQ word holds column AWQ_ORDER[i] of its eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_FP8_SCALES = ("weight_scale", "weight_scale_inv")  # compressed-tensors; Hugging Face's fp8 (a multiplier too)


@dataclass(frozen=True)
class QuantScheme:
    method: Literal["awq", "gptq", "fp8", "mxfp4"]
    group_size: int = 0  # awq, gptq
    zero_offset: int = 0  # gptq's original format stores each zero point minus one
    block: int = 128  # fp8 scaled per square block

    @property
    def grouped(self) -> bool:
        return self.method in ("awq", "gptq")


def quant_scheme(config: dict[str, Any]) -> QuantScheme | None:
    """The checkpoint's quantisation from its config.json; None when its weights are plain, or quantised by MLX (no
    quant_method: only the mlx engine reads them). An unsupported method or setting is a ModelLoadError naming it."""
    settings = config.get("quantization_config")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ModelLoadError(f"config.json's quantization_config is {settings!r}, not an object")
    if "quant_method" not in settings:
        return None
    method = str(settings["quant_method"]).lower()
    if method == "awq":
        return _awq(settings)
    if method == "gptq":
        return _gptq(settings)
    if method == "fp8":
        return _fp8(settings)
    if method == "compressed-tensors":
        return _compressed_tensors(settings)
    if method == "mxfp4":
        return _mxfp4(config)
    raise unsupported(repr(method))


def unsupported(what: str) -> ModelLoadError:
    return ModelLoadError(f"the checkpoint's weights are quantised with {what} (its quantization_config), which "
                          f"ringlet does not read (it reads {SUPPORTED}); use the model's bf16 checkpoint, one "
                          "quantised in a way ringlet reads, or a GGUF file of it")


def _four_bit_groups(method: str, group_size: Any, bits: Any) -> int:
    if bits != 4:
        raise unsupported(f"{method} {bits}-bit")
    if group_size not in GROUP_SIZES:
        raise unsupported(f"{method} with group_size {group_size} (the int4 kernels take {GROUP_SIZES})")
    return int(group_size)


def _awq(settings: dict[str, Any]) -> QuantScheme:
    version = str(settings.get("version", "gemm")).lower()
    if version != "gemm":
        raise unsupported(f"awq version {version!r}")
    if not settings.get("zero_point", True):
        raise unsupported("awq without zero points")
    group_size = _four_bit_groups("awq", settings.get("group_size", settings.get("q_group_size")),
                                  settings.get("bits", settings.get("w_bit")))
    return QuantScheme("awq", group_size)


def _gptq(settings: dict[str, Any]) -> QuantScheme:
    group_size = _four_bit_groups("gptq", settings.get("group_size"), settings.get("bits"))
    if settings.get("pack_dtype", "int32") != "int32":
        raise unsupported(f"gptq packed in {settings['pack_dtype']}")
    layout = str(settings.get("checkpoint_format", settings.get("format", "gptq"))).lower()
    if layout not in ("gptq", "gptq_v2"):
        raise unsupported(f"gptq checkpoint_format {layout!r}")
    return QuantScheme("gptq", group_size, zero_offset=1 if layout == "gptq" else 0)


def _fp8(settings: dict[str, Any]) -> QuantScheme:
    if str(settings.get("fmt", "e4m3")).lower() != "e4m3":
        raise unsupported(f"fp8 format {settings['fmt']!r}")
    block = settings.get("weight_block_size") or [128, 128]
    if len(block) != 2 or block[0] != block[1]:
        raise unsupported(f"fp8 with weight blocks of {block}")
    return QuantScheme("fp8", block=int(block[0]))


def _mxfp4(config: dict[str, Any]) -> QuantScheme:
    if config.get("model_type") != "gpt_oss":
        raise ModelLoadError(f"the checkpoint's weights are quantised with mxfp4 (its quantization_config), which "
                             f"ringlet reads for gpt_oss's experts only, not for a {config.get('model_type')!r} model; "
                             "use the model's bf16 checkpoint or a GGUF file of it")
    return QuantScheme("mxfp4")


def _compressed_tensors(settings: dict[str, Any]) -> QuantScheme:
    layout = settings.get("format")
    if layout not in ("float-quantized", "naive-quantized"):
        raise unsupported(f"compressed-tensors format {layout!r}")
    blocks = set()
    for name, group in (settings.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise unsupported(f"compressed-tensors {weights.get('type')} {weights.get('num_bits')}-bit weights "
                              f"(config group {name!r})")
        if weights.get("strategy") not in ("tensor", "channel", "block"):
            raise unsupported(f"compressed-tensors fp8 scaled per {weights.get('strategy')} (config group {name!r})")
        if weights.get("strategy") == "block":
            block = weights.get("block_structure") or [128, 128]
            if len(block) != 2 or block[0] != block[1]:
                raise unsupported(f"compressed-tensors fp8 with weight blocks of {block}")
            blocks.add(int(block[0]))
    if len(blocks) > 1:
        raise unsupported(f"compressed-tensors fp8 with several block sizes {sorted(blocks)}")
    return QuantScheme("fp8", block=blocks.pop() if blocks else 128)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> uint8 [..., W, 8]: nibble i is bits 4i..4i+3 of its word."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed.to(torch.int32)[..., None] >> shifts) & 0xF).to(torch.uint8)


def _groups(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> GroupQuantized:
    """From the checkpoints' [K, N] layout (codes [K, N], zeros and scales [K / group, N]) to the linear's [N, K]."""
    scale = scales.float().t().contiguous()
    return GroupQuantized(codes.t().contiguous(), scale, (-zeros.float().t() * scale).contiguous(), group_size)


def _check_shapes(name: str, shapes: dict[str, torch.Size], expected: dict[str, tuple[int, int]]) -> None:
    wrong = {part: tuple(shape) for part, shape in shapes.items() if tuple(shape) != expected[part]}
    if wrong:
        raise ModelLoadError(f"{name}: packed tensors of shapes {wrong}, expected {expected}; the checkpoint does not "
                             "match its quantization_config")


def unpack_awq(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> GroupQuantized:
    """AWQ's GEMM layout: qweight [K, N / 8], qzeros [K / group, N / 8], scales [K / group, N]."""
    k, n = qweight.shape[0], scales.shape[1]
    _check_shapes(name, {"qweight": qweight.shape, "qzeros": qzeros.shape, "scales": scales.shape},
                  {"qweight": (k, n // 8), "qzeros": (k // group_size, n // 8), "scales": (k // group_size, n)})
    inverse = torch.tensor(AWQ_ORDER).argsort()

    def columns(packed: torch.Tensor) -> torch.Tensor:
        return _nibbles(packed)[..., inverse].reshape(packed.shape[0], -1)

    return _groups(columns(qweight), columns(qzeros), scales, group_size)


def unpack_gptq(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, group_size: int, zero_offset: int) -> GroupQuantized:
    """GPTQ: qweight [K / 8, N] (eight consecutive inputs a word), qzeros [K / group, N / 8] (eight consecutive
    outputs a word), scales [K / group, N], g_idx [K] the group of each input."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = k // group_size
    _check_shapes(name, {"qzeros": qzeros.shape, "scales": scales.shape},
                  {"qzeros": (groups, n // 8), "scales": (groups, n)})
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(k, n)
    zeros = _nibbles(qzeros).reshape(groups, n).float() + zero_offset
    if g_idx is not None:
        order = _group_order(name, g_idx, k, group_size)
        scales, zeros = scales[order], zeros[order]
    return _groups(codes, zeros, scales, group_size)


def _group_order(name: str, g_idx: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """The group of each run of `group_size` consecutive inputs. With act-order (desc_act) GPTQ may number the
    groups in another order, which is the same weight once the groups' scales are reordered; groups whose inputs
    are not consecutive have no such form."""
    runs = g_idx.long().reshape(k // group_size, group_size)
    labels = runs[:, 0]
    if not bool((runs == labels[:, None]).all()) or not torch.equal(labels.sort().values, torch.arange(len(labels))):
        raise ModelLoadError(f"{name}: its GPTQ g_idx spreads each group over inputs that are not consecutive "
                             "(act-order, desc_act=true), which ringlet's int4 kernels cannot run; use a GPTQ "
                             "checkpoint made with desc_act=false or static_groups=true, or the bf16 checkpoint")
    return labels


class QuantizedLinears:
    """The quantised linears of a checkpoint by Hugging Face weight name (`model.layers.3.mlp.up_proj.weight`),
    each read from its packed tensors when asked for. A layer's are unpacked once: kept from its dense weights
    (`dense`, as the layer is built) until its own codes are taken (`load_groups`, `load_fp8`) or another layer's
    are read."""

    def __init__(self, scheme: QuantScheme, tensor_names: Iterable[str], read: Callable[[str], torch.Tensor]) -> None:
        self.scheme, self._read = scheme, read
        self._held: dict[str, GroupQuantized | Fp8Weight] = {}
        names = set(tensor_names)
        self.parts: dict[str, list[str]] = {}  # weight name -> the checkpoint tensors it is made of
        for tensor in names:
            if scheme.grouped and tensor.endswith(".qweight"):
                base = tensor.removesuffix(".qweight")
                self.parts[f"{base}.weight"] = [f"{base}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")
                                                if f"{base}.{p}" in names]
            elif not scheme.grouped and tensor.endswith(".weight"):
                base = tensor.removesuffix(".weight")
                scale = next((f"{base}.{s}" for s in _FP8_SCALES if f"{base}.{s}" in names), None)
                if scale is not None:
                    self.parts[tensor] = [tensor, scale, *[f"{base}.input_scale"] * (f"{base}.input_scale" in names)]
        if scheme.grouped:
            for weight, parts in self.parts.items():
                missing = {"qzeros", "scales"} - {p.rpartition(".")[2] for p in parts}
                if missing:
                    raise ModelLoadError(f"{weight.removesuffix('.weight')}: the checkpoint has its qweight but not "
                                         f"{', '.join(sorted(missing))}; re-download the model")

    @property
    def group_size(self) -> int:
        return self.scheme.group_size

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {part.rpartition(".")[2]: self._read(part) for part in self.parts[name]}

    def groups(self, name: str) -> GroupQuantized:
        t = self._tensors(name)
        base = name.removesuffix(".weight")
        if self.scheme.method == "awq":
            return unpack_awq(base, t["qweight"], t["qzeros"], t["scales"], self.group_size)
        return unpack_gptq(base, t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), self.group_size,
                           self.scheme.zero_offset)

    def fp8(self, name: str) -> Fp8Weight:
        t = self._tensors(name)
        scale = t.get("weight_scale", t.get("weight_scale_inv"))
        assert scale is not None  # a weight is listed with its scale
        try:
            return Fp8Weight.from_checkpoint(t["weight"], scale, self.scheme.block)
        except ValueError as e:
            raise ModelLoadError(f"{name}: {e}") from None

    def _unpacked(self, name: str) -> GroupQuantized | Fp8Weight:
        if name not in self._held:
            self._held = {held: w for held, w in self._held.items() if _layer(held) == _layer(name)}
            self._held[name] = self.groups(name) if self.scheme.grouped else self.fp8(name)
        return self._held[name]

    def _take(self, name: str) -> GroupQuantized | Fp8Weight:
        return self._held.pop(name, None) or (self.groups(name) if self.scheme.grouped else self.fp8(name))

    def dense(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        return self._unpacked(name).dequantize().to(dtype or torch.float32)

    def stores_groups(self, start: int, end: int) -> bool:
        """Whether any linear of layers [start, end) is stored in 4-bit groups (`load_groups`)."""
        return self.scheme.grouped and any(_layer(name) in range(start, end) for name in self.parts)

    def load_groups(self, start: int, end: int) -> dict[str, GroupQuantized]:
        """The 4-bit linears of layers [start, end) as their own codes, scales and offsets."""
        if not self.scheme.grouped:
            return {}
        return {name: cast(GroupQuantized, self._take(name)) for name in self.parts if _layer(name) in range(start, end)}

    def load_fp8(self, start: int, end: int, device: torch.device | str) -> dict[str, Fp8Weight]:
        """The fp8 linears of layers [start, end), on `device`."""
        if self.scheme.grouped:
            return {}
        loaded = {}
        for name in self.parts:
            if _layer(name) in range(start, end):
                w = cast(Fp8Weight, self._take(name))
                loaded[name] = Fp8Weight(w.weight.to(device), w.scale.to(device), w.block)
        return loaded


def _layer(name: str) -> int:
    """The decoder layer of a `model.layers.{i}.` name; -1 for the others (embedding, lm_head)."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else -1
