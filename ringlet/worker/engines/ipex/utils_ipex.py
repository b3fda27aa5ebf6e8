"""Loading a model (or a stage's layers) for the ipex engine: the GPU first, then the memory check, then weights,
then the optimisation.

The GPU: the instance's `intel_gpu_devices`, else the node's discrete Intel GPUs (every one where none is), the
first of them with room for the layers; or, where placement split the shard over several (`Shard.devices`), each
of those for its layers, as one `IpexChain`. The optimisation, as the instance's `ipex_optimization_level` says:
  - ipex: IPEX importable and built for this torch, else an error: `ipex.optimize` (prepacked linears), or on the
    CPU with precision int8 IPEX's weight-only int8 quantisation (`prepare`/`convert`);
  - compile: `torch.compile` of the fusable layers (PyTorch compiles for XPU natively), eager again where the
    compiler fails at warm-up (`compiled.py`);
  - eager: nothing;
  - auto: ipex where IPEX is usable, else compile. On the CPU the ipex engine exists to run IPEX's CPU backend,
    so there only ipex (or auto, which then requires it) is accepted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import cast

import torch
from torch import nn

from ringlet.models.config import ModelArgs
from ringlet.models.loader import Quantization, load_stage, read_model_config
from ringlet.models.quant import COMPUTE_DTYPES, cpu_supports_bf16, dequantizing_in_matmul
from ringlet.shared.config import DEFAULT_MAX_CONTEXT, PRECISIONS, EngineConfig
from ringlet.shared.instances import BoundInstance, IpexOptimizationLevel
from ringlet.worker.engines.engine_utils import (
    IPEX_XPU_INSTALL,
    ProbeInputs,
    ipex_status,
    xpu_device_count,
    xpu_is_integrated,
    xpu_properties,
)
from ringlet.worker.engines.ipex import IPEXEngineError, IpexLoadedModel, IPEXMemoryError, IpexMode
from ringlet.worker.engines.ipex.chain import IpexChain
from ringlet.worker.engines.ipex.compiled import compile_fusable_layers
from ringlet.worker.engines.ipex.device import ComputeDevice, HostDevice, XpuDevice, open_xpu
from ringlet.worker.engines.ipex.engine import IpexEngine, own_kv_cache_tokens
from ringlet.worker.engines.ipex.int4_xpu import use_int4_kernel
from ringlet.worker.engines.torch.batch_engine import BLOCK_SIZE

log = logging.getLogger(__name__)

IPEX_INSTALL_FIX = ", then ".join(IPEX_XPU_INSTALL) + "; without IPEX the engine runs on native torch.xpu"
# IPEX's CPU backend: PyPI's torch 2.8 and IPEX 2.8 are CPU builds, so the extra alone
IPEX_CPU_INSTALL_FIX = ("pip install 'ringlet[ipex]' in an environment of its own (it pins PyTorch 2.8; "
                        "docs/install.md, step 6)")
PREFILL_CHUNK = EngineConfig().max_step_tokens  # a batched step's tokens; sizes the activation workspace below


def import_ipex(mode: IpexMode, fix: str = IPEX_INSTALL_FIX) -> ModuleType | None:
    """The IPEX module, or None where it is not to be used; with mode "require", an error instead of None (`fix`:
    how to install it for the device it is for)."""
    if mode == "off":
        return None
    status = ipex_status()
    if not status.usable:
        if mode == "require":
            raise IPEXEngineError(f"IPEX is required but {status.reason}; fix: {fix}")
        log.info("ipex: %s; running on native torch (fix: %s)", status.reason, fix)
        return None
    try:
        import intel_extension_for_pytorch as ipex
    # ImportError/OSError: a missing shared library (oneAPI runtime, Level Zero). AttributeError: IPEX's
    # own version guard calls os.exit, which does not exist, when torch was swapped underneath it.
    except (ImportError, OSError, AttributeError) as e:
        message = (f"intel-extension-for-pytorch {status.version} is installed but failed to import "
                   f"({type(e).__name__}: {e})")
        if mode == "require":
            raise IPEXEngineError(f"{message}; fix: reinstall it with a matching torch: {fix}") from e
        log.warning("ipex: %s; running on native torch without IPEX optimisations", message)
        return None
    return ipex


def resolve_precision(precision: str, device: ComputeDevice) -> str:
    """auto: bf16 on an Intel GPU; on the CPU int8 weights (bf16 compute) where bf16 is native, else fp32. On an
    Intel GPU int8 and int4 are ringlet's weight-only linears, dequantised in the matmul (`models/quant.py`)."""
    if precision not in PRECISIONS:
        raise IPEXEngineError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    on_host = isinstance(device, HostDevice)
    if precision == "auto":
        return ("int8" if cpu_supports_bf16() else "fp32") if on_host else "bf16"
    if precision == "int4" and on_host:
        raise IPEXEngineError("IPEX's CPU backend quantises weights to int8 only; use --precision int8, or the cpu "
                              "engine for int4")
    return precision


def model_dtype(precision: str, on_host: bool = True) -> torch.dtype:
    """int8 / int4: everything but the quantised linears (embeddings, norms, KV cache) in bf16 where it is native."""
    if precision in ("int8", "int4"):
        return torch.bfloat16 if cpu_supports_bf16() or not on_host else torch.float32
    return COMPUTE_DTYPES[precision]


def estimate_bytes(args: ModelArgs, precision: str, context_length: int, start: int = 0, end: int | None = None,
                   on_host: bool = True) -> int:
    """Device memory layers [start, end) of a model need (all of them by default): their weights (with the
    embedding on the first stage, the lm_head on the last), their static KV cache, one prefill chunk's workspace."""
    end = args.num_hidden_layers if end is None else end
    itemsize = torch.empty(0, dtype=model_dtype(precision, on_host)).element_size()
    quantized = precision in ("int8", "int4")
    per_weight = 1 if quantized else itemsize  # an Int4Linear keeps its codes twice: a byte a weight, as int8
    embedding = args.vocab_size * args.hidden_size
    per_layer = (args.num_parameters - embedding * (1 if args.tie_word_embeddings else 2)) / args.num_hidden_layers
    weights = per_layer * (end - start) * per_weight
    if start == 0:
        weights += embedding * per_weight  # int8 rows where quantised
    if end == args.num_hidden_layers and not (args.tie_word_embeddings and start == 0):
        weights += embedding * per_weight  # its own lm_head: untied, or a later stage's copy of a tied embedding
    kv = (end - start) * 2 * args.num_key_value_heads * args.head_dim * context_length * itemsize
    # attention scores of one chunk against the whole context, plus the MLP's widest activations
    work = PREFILL_CHUNK * (args.num_attention_heads * context_length + 2 * args.intermediate_size) * itemsize
    return int((weights + kv + work) * 1.05)


def check_fits(device: ComputeDevice, needed: int, what: str) -> None:
    free = device.free_bytes()
    if needed > free:
        raise IPEXMemoryError(
            f"{what} needs about {needed / 2**30:.2f} GiB on {device.name} but only {free / 2**30:.2f} GiB is free: "
            "use a smaller model or precision, lower the context length, or split the model across more nodes",
            needed_bytes=needed, free_bytes=free,
        )


def choose_xpu(devices: tuple[int, ...] | None, needed: int, what: str, probes: ProbeInputs | None = None
               ) -> XpuDevice:
    """The Intel GPU a stage runs on whole: the first of `devices` (None: the discrete ones, or every one where none
    is discrete) with `needed` bytes free. Placement splits a stage over several GPUs where none holds it."""
    first = open_xpu(probes, index=0 if devices is None else devices[0])
    runtime = first.runtime
    if devices is None:
        every = range(xpu_device_count(runtime)[0])
        # unknown (properties unreadable, a name the heuristic does not know) counts as discrete: it is tried
        discrete = [i for i in every if xpu_is_integrated(xpu_properties(runtime, i)) is not True]
        devices = tuple(discrete or every)
    else:
        for index in devices[1:]:
            open_xpu(probes, index=index)  # each index exists
    candidates = [XpuDevice(runtime, index) for index in devices]
    free = [device.free_bytes() for device in candidates]
    for device, available in zip(candidates, free, strict=True):
        if needed <= available:
            return device
    if len(candidates) == 1:
        check_fits(candidates[0], needed, what)
    room = ", ".join(f"{device.name}: {available / 2**30:.2f} GiB" for device, available in zip(candidates, free,
                                                                                                 strict=True))
    raise IPEXMemoryError(
        f"{what} needs about {needed / 2**30:.2f} GiB on one Intel GPU, and none of the {len(candidates)} chosen "
        f"has it free ({room}); create the instance again, and placement splits it over the GPUs' free memory as "
        "it is now, or use a smaller model or precision, or lower the context length",
        needed_bytes=needed, free_bytes=max(free))


def _onednn_runs(ipex: ModuleType, precision: str) -> bool:
    """IPEX's oneDNN has {precision} kernels for this CPU (what `ipex.optimize` asserts before prepacking)."""
    check = getattr(ipex._C, f"onednn_has_{precision}_support", None)
    return True if check is None else bool(check())


def _count_ipex_modules(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m).__module__.startswith("intel_extension_for_pytorch"))


def _ipex_optimize(ipex: ModuleType, model: nn.Module, precision: str, dtype: torch.dtype,
                   on_host: bool) -> tuple[nn.Module, str]:
    linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    if precision == "int8":
        from intel_extension_for_pytorch.quantization import (
            WoqLowpMode,
            WoqWeightDtype,
            convert,
            get_weight_only_quant_qconfig_mapping,
            prepare,
        )

        lowp = WoqLowpMode.BF16 if dtype == torch.bfloat16 else WoqLowpMode.NONE
        qconfig = get_weight_only_quant_qconfig_mapping(weight_dtype=WoqWeightDtype.INT8, lowp_mode=lowp)
        model = convert(prepare(model, qconfig, example_inputs=None, inplace=True))
        method = f"IPEX weight-only int8 ({lowp.name} compute)"
    else:
        model = ipex.optimize(model.eval(), dtype=dtype, inplace=True)
        method = f"ipex.optimize ({precision})"
    replaced = _count_ipex_modules(model)
    if on_host and replaced == 0:  # on the CPU both paths swap in IPEX's own linear layers
        raise IPEXEngineError(f"{method} left every layer unchanged; IPEX {ipex.__version__} cannot optimise "
                              "this model on this CPU; use the cpu engine")
    return model, f"{method}: {replaced} of {linears} linear layers replaced by IPEX's"


def ipex_for(level: IpexOptimizationLevel, precision: str, device: ComputeDevice) -> ModuleType | None:
    """The IPEX module the optimisation `level` uses on `device`, imported before any weight is read; errors say why
    the level cannot be applied. On a CPU the ipex engine is IPEX's CPU backend or nothing."""
    if isinstance(device, HostDevice):
        if level in ("compile", "eager"):
            raise IPEXEngineError(f"the ipex engine runs on the CPU only through IPEX, not {level}; without IPEX "
                                  "use the cpu engine")
        return import_ipex("require", IPEX_CPU_INSTALL_FIX)
    if precision in ("int8", "int4"):
        if level == "ipex":
            raise IPEXEngineError(f"{precision} on an Intel GPU runs ringlet's quantised linears, which IPEX does not "
                                  "optimise; use --ipex-optimization-level compile or eager, or --precision bf16")
        return None
    if level in ("compile", "eager"):
        return None
    return import_ipex("require" if level == "ipex" else "auto")


def optimize(model: nn.Module, level: IpexOptimizationLevel, ipex: ModuleType | None, precision: str,
             device: ComputeDevice) -> tuple[nn.Module, str]:
    """`level` applied to `model` (with `ipex` from `ipex_for`): the model and what was applied."""
    on_host = isinstance(device, HostDevice)
    if ipex is not None:
        return _ipex_optimize(ipex, model, precision, model_dtype(precision, on_host), on_host)
    if level == "eager":
        return model, "eager (native torch.xpu, no IPEX, not compiled)"
    compiled = compile_fusable_layers(model)
    no_ipex = "IPEX not asked for" if level == "compile" else "no IPEX"
    return model, f"torch.compile of {compiled} MLP and norm layers (native torch.xpu, {no_ipex})"


def load_ipex_model(
    model_ref: str | Path | None, device: ComputeDevice, precision: str = "auto",
    max_context: int = DEFAULT_MAX_CONTEXT, optimization: IpexOptimizationLevel = "auto", start: int = 0,
    end: int | None = None,
) -> IpexLoadedModel:
    """Check memory, load layers [start, end) (all by default) of the shared model definition onto the device,
    then optimise them."""
    on_host = isinstance(device, HostDevice)
    precision = resolve_precision(precision, device)
    path, args = read_model_config(model_ref)
    end = args.num_hidden_layers if end is None else end
    context_length = min(args.context_length, max_context)
    layers = _layers(args, start, end)
    check_fits(device, estimate_bytes(args, precision, context_length, start, end, on_host),
               f"{path.name}{layers} ({precision})")
    ipex = ipex_for(optimization, precision, device)  # before loading: a failure here costs no weight reading
    if on_host and ipex is not None and precision in ("bf16", "fp16") and not _onednn_runs(ipex, precision):
        raise IPEXEngineError(
            f"IPEX's CPU backend cannot run {precision} on this CPU (its oneDNN needs AVX-512 BW/VL/DQ or "
            f"AVX-NE-CONVERT, which this processor lacks); use --precision fp32 or int8, or the cpu engine")

    dtype = model_dtype(precision, on_host)
    if precision in ("int8", "int4") and not on_host:  # quantised on the host, a layer at a time, then moved
        stage = load_stage(path, start, end, dtype=dtype, device="cpu", quantize=cast(Quantization, precision),
                           runs_here=False)
        switched = dequantizing_in_matmul(stage.model)
        stage.model.to(device.torch_device)
        on_kernel = use_int4_kernel(stage.model, dtype) if precision == "int4" else 0
        quantized = (f"; {on_kernel} int4 linears on PyTorch's XPU int4 kernel" if on_kernel else "") + (
            f"; {switched - on_kernel} {precision} weight-only linears dequantised in the matmul")
    else:
        stage, quantized = load_stage(path, start, end, dtype=dtype, device=device.torch_device), ""
    model, applied = optimize(stage.model, optimization, ipex, precision, device)
    applied += quantized
    log.info("ipex: %s%s on %s, %s", path.name, layers, device.name, applied)
    return IpexLoadedModel(stage, model, precision, context_length, applied,  # type: ignore[arg-type]
                           getattr(ipex, "__version__", None))


def load_ipex_engine(
    model: str | Path | None = None, device: str | ComputeDevice = "xpu", config: EngineConfig = EngineConfig(),
    optimization: IpexOptimizationLevel = "auto", max_retries: int = 3,
) -> IpexEngine:
    """The ipex engine of a whole model; device: "xpu", "xpu:N", "cpu" (IPEX's CPU backend) or a ComputeDevice."""
    target = _device(device)
    loaded = load_ipex_model(model, target, config.precision, config.max_context, optimization)
    return IpexEngine(loaded, target, model, config, max_retries)


def initialize_ipex(bound_instance: BoundInstance, config: EngineConfig, device: str | ComputeDevice | None = None,
                    probes: ProbeInputs | None = None) -> IpexEngine | IpexChain:
    """The engine of a single-stage instance on the instance's Intel GPU (`choose_xpu`), or on the GPUs placement
    split it over (an `IpexChain`), or on `device` ("cpu": IPEX's CPU backend), optimised as the instance says."""
    if device is not None:
        return load_ipex_engine(bound_instance.instance.model, device=device, config=config,
                                optimization=bound_instance.instance.ipex_optimization_level)
    return ipex_engine_of(bound_instance, config, load_ipex_parts(bound_instance, config, probes))


def load_ipex_parts(bound: BoundInstance, config: EngineConfig, probes: ProbeInputs | None = None
                    ) -> list[tuple[IpexLoadedModel, XpuDevice]]:
    """The layers of this node's shard of `bound` on its Intel GPU, or, where placement split the shard, on each of
    its GPUs in layer order (every one checked for its own layers' memory before any weight is read)."""
    if not bound.shard.devices:
        return [load_ipex_layers(bound, config, probes)]
    devices = [open_xpu(probes, index=part.device) for part in bound.shard.devices]
    for part, compute in zip(bound.shard.devices, devices, strict=True):
        check_fits(compute, *gpu_layers_need(bound.instance.model, config, part.start, part.end))
    return [(load_ipex_model(bound.instance.model, compute, config.precision, config.max_context,
                             bound.instance.ipex_optimization_level, part.start, part.end), compute)
            for part, compute in zip(bound.shard.devices, devices, strict=True)]


def ipex_engine_of(bound: BoundInstance, config: EngineConfig, parts: list[tuple[IpexLoadedModel, XpuDevice]],
                   num_blocks: int | None = None, context_length: int | None = None) -> IpexEngine | IpexChain:
    """`parts` as one engine (a chain where there are several), whose KV cache holds the blocks every part can
    (`num_blocks`: as the ring agreed)."""
    context_length = context_length or min(loaded.context_length for loaded, _ in parts)
    if num_blocks is None:
        num_blocks = own_ipex_blocks(parts, config, context_length)
    model = bound.instance.model
    if len(parts) == 1:
        (loaded, compute), = parts
        return IpexEngine(loaded, compute, model, config, num_blocks=num_blocks, context_length=context_length)
    whole = "this instance" if len(bound.instance.shards) == 1 else "this stage of the ring"
    return IpexChain([IpexEngine(loaded, compute, model, config, num_blocks=num_blocks, context_length=context_length,
                                 owner=f"layers {loaded.stage.start}-{loaded.stage.end - 1} of {whole}")
                      for loaded, compute in parts])


def own_ipex_blocks(parts: list[tuple[IpexLoadedModel, XpuDevice]], config: EngineConfig, context_length: int) -> int:
    """The KV cache blocks every part's device holds for its layers: the fewest."""
    return min(-(-own_kv_cache_tokens(loaded.stage, compute, config, context_length) // BLOCK_SIZE)
               for loaded, compute in parts)


def gpu_layers_need(model_ref: str | Path | None, config: EngineConfig, start: int, end: int) -> tuple[int, str]:
    """The bytes layers [start, end) of a model need on an Intel GPU at `config`'s precision, and their name."""
    path, args = read_model_config(model_ref)
    precision = "bf16" if config.precision == "auto" else config.precision
    needed = estimate_bytes(args, precision, min(args.context_length, config.max_context), start, end, on_host=False)
    return needed, f"{path.name}{_layers(args, start, end)} ({precision})"


def _layers(args: ModelArgs, start: int, end: int) -> str:
    """" layers 3-9" of a stage, nothing for the whole model."""
    return "" if (start, end) == (0, args.num_hidden_layers) else f" layers {start}-{end - 1}"


def load_ipex_layers(bound: BoundInstance, config: EngineConfig, probes: ProbeInputs | None = None
                     ) -> tuple[IpexLoadedModel, XpuDevice]:
    """The layers of this node's shard of `bound` on the Intel GPU chosen for their memory, optimised as the
    instance says."""
    shard = bound.shard
    compute = choose_xpu(bound.instance.intel_gpu_devices,
                         *gpu_layers_need(bound.instance.model, config, shard.start, shard.end), probes)
    loaded = load_ipex_model(bound.instance.model, compute, config.precision, config.max_context,
                             bound.instance.ipex_optimization_level, shard.start, shard.end)
    return loaded, compute


def _device(device: str | ComputeDevice) -> ComputeDevice:
    if not isinstance(device, str):
        return device
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return HostDevice()
    if kind == "xpu":
        return open_xpu(index=int(index or 0))
    raise ValueError(f"the ipex engine runs on 'xpu', 'xpu:N' or 'cpu' (IPEX's CPU backend), not {device!r}")
