"""Loading a model for the ipex engine: memory check first, then weights, then the optimisation.

Optimisation, in order of preference:
  - IPEX importable and built for this torch: `ipex.optimize` (prepacked linears), or on the CPU with
    precision int8 IPEX's weight-only int8 quantisation (`prepare`/`convert`);
  - otherwise, on an Intel GPU: `torch.compile` of the fusable layers (PyTorch compiles for XPU natively);
  - never silently nothing on the CPU: the ipex engine on a CPU exists to run IPEX's CPU backend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ringlet.models.config import ModelArgs
from ringlet.models.llama import MLP, RMSNorm
from ringlet.models.loader import load_stage, read_model_config
from ringlet.models.quant import COMPUTE_DTYPES, cpu_supports_bf16
from ringlet.shared.config import DEFAULT_MAX_CONTEXT, PRECISIONS, EngineConfig
from ringlet.shared.instances import BoundInstance
from ringlet.worker.engines.engine_utils import ipex_status
from ringlet.worker.engines.ipex import IPEXEngineError, IpexLoadedModel, IPEXMemoryError, IpexMode
from ringlet.worker.engines.ipex.device import ComputeDevice, HostDevice, open_xpu
from ringlet.worker.engines.ipex.engine import IpexEngine

log = logging.getLogger(__name__)

IPEX_INSTALL_FIX = ("pip install 'ringlet[ipex]' (PyTorch 2.8 with intel-extension-for-pytorch 2.8, its last "
                    "release); without it the engine runs on native torch.xpu")
IPEX_PRECISIONS = tuple(p for p in PRECISIONS if p != "int4")  # IPEX's weight-only quantisation is int8
PREFILL_CHUNK = EngineConfig().max_step_tokens  # a batched step's tokens; sizes the activation workspace below


def import_ipex(mode: IpexMode) -> ModuleType | None:
    """The IPEX module, or None where it is not to be used; with mode "require", an error instead of None."""
    if mode == "off":
        return None
    status = ipex_status()
    if not status.usable:
        if mode == "require":
            raise IPEXEngineError(f"IPEX is required but {status.reason}; fix: {IPEX_INSTALL_FIX}")
        log.info("ipex: %s; running on native torch (fix: %s)", status.reason, IPEX_INSTALL_FIX)
        return None
    try:
        import intel_extension_for_pytorch as ipex
    # ImportError/OSError: a missing shared library (oneAPI runtime, Level Zero). AttributeError: IPEX's
    # own version guard calls os.exit, which does not exist, when torch was swapped underneath it.
    except (ImportError, OSError, AttributeError) as e:
        message = (f"intel-extension-for-pytorch {status.version} is installed but failed to import "
                   f"({type(e).__name__}: {e})")
        if mode == "require":
            raise IPEXEngineError(f"{message}; fix: reinstall it with a matching torch: {IPEX_INSTALL_FIX}") from e
        log.warning("ipex: %s; running on native torch without IPEX optimisations", message)
        return None
    return ipex


def resolve_precision(precision: str, device: ComputeDevice) -> str:
    """auto: bf16 on an Intel GPU; on the CPU int8 weights (bf16 compute) where bf16 is native, else fp32."""
    if precision not in IPEX_PRECISIONS:
        raise IPEXEngineError(f"precision {precision!r} is not one of {', '.join(IPEX_PRECISIONS)}")
    on_host = isinstance(device, HostDevice)
    if precision == "auto":
        return ("int8" if cpu_supports_bf16() else "fp32") if on_host else "bf16"
    if precision == "int8" and not on_host:
        raise IPEXEngineError("int8 (IPEX weight-only quantisation) runs on IPEX's CPU backend only; "
                              "use --precision bf16 or fp16 on an Intel GPU")
    return precision


def model_dtype(precision: str) -> torch.dtype:
    if precision == "int8":  # int8 weights; everything else (embeddings, norms, KV cache) in bf16 where native
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return COMPUTE_DTYPES[precision]


def estimate_bytes(args: ModelArgs, precision: str, context_length: int) -> int:
    """Device memory a whole model needs: weights, the static KV cache, and one prefill chunk's workspace."""
    itemsize = torch.empty(0, dtype=model_dtype(precision)).element_size()
    embedding = args.vocab_size * args.hidden_size
    linear = args.num_parameters - embedding * (1 if args.tie_word_embeddings else 2)
    weights = embedding * itemsize + (linear + (embedding if args.tie_word_embeddings else 0)) * (
        1 if precision == "int8" else itemsize)
    kv = args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim * context_length * itemsize
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


def compile_fusable_layers(model: nn.Module) -> int:
    """torch.compile the MLPs and RMSNorms in place: they take and return tensors only and fuse well
    (SiLU times up-projection, the norm's casts), cutting kernel launches per token. Whole blocks are not
    compiled: the attention indexes its layer's cache slot by a Python int, which would specialise
    (recompile) once per layer. dynamic: the token count changes between prefill and decode."""
    count = 0
    for module in model.modules():
        if isinstance(module, (MLP, RMSNorm)):
            module.compile(dynamic=True)
            count += 1
    return count


def load_ipex_model(
    model_ref: str | Path | None, device: ComputeDevice, precision: str = "auto",
    max_context: int = DEFAULT_MAX_CONTEXT, ipex_mode: IpexMode = "auto", compile_model: bool | None = None,
) -> IpexLoadedModel:
    """Check memory, load the shared model definition onto the device, then optimise it."""
    on_host = isinstance(device, HostDevice)
    if on_host:  # on a CPU the ipex engine is IPEX's CPU backend or nothing: plain torch is the cpu engine
        if ipex_mode == "off":
            raise IPEXEngineError("the ipex engine runs on the CPU only through IPEX; without IPEX use the cpu engine")
        ipex_mode = "require"
    precision = resolve_precision(precision, device)
    path, args = read_model_config(model_ref)
    context_length = min(args.context_length, max_context)
    check_fits(device, estimate_bytes(args, precision, context_length), f"{path.name} ({precision})")
    ipex = import_ipex(ipex_mode)  # before loading: a failure here costs no weight reading
    if on_host and ipex is not None and precision in ("bf16", "fp16") and not _onednn_runs(ipex, precision):
        raise IPEXEngineError(
            f"IPEX's CPU backend cannot run {precision} on this CPU (its oneDNN needs AVX-512 BW/VL/DQ or "
            f"AVX-NE-CONVERT, which this processor lacks); use --precision fp32 or int8, or the cpu engine")

    dtype = model_dtype(precision)
    stage = load_stage(path, dtype=dtype, device=device.torch_device)
    model: nn.Module = stage.model
    if ipex is not None:
        model, optimization = _ipex_optimize(ipex, model, precision, dtype, on_host)
    elif compile_model if compile_model is not None else device.torch_device.type == "xpu":
        compiled = compile_fusable_layers(model)
        optimization = f"torch.compile of {compiled} MLP and norm layers (native torch.xpu, no IPEX)"
    else:
        optimization = "none (native torch.xpu, no IPEX, not compiled)"
    log.info("ipex: %s on %s, %s", path.name, device.name, optimization)
    return IpexLoadedModel(stage, model, precision, context_length, optimization,  # type: ignore[arg-type]
                           getattr(ipex, "__version__", None))


def load_ipex_engine(
    model: str | Path | None = None, device: str | ComputeDevice = "xpu", config: EngineConfig = EngineConfig(),
    ipex: IpexMode = "auto", compile_model: bool | None = None, max_retries: int = 3,
) -> IpexEngine:
    """The ipex engine of a whole model; device: "xpu", "xpu:N", "cpu" (IPEX's CPU backend) or a ComputeDevice."""
    target = _device(device)
    loaded = load_ipex_model(model, target, config.precision, config.max_context, ipex, compile_model)
    return IpexEngine(loaded, target, model, config, max_retries)


def initialize_ipex(bound_instance: BoundInstance, config: EngineConfig, device: str | ComputeDevice = "xpu"
                    ) -> IpexEngine:
    """The engine of a single-stage instance on this node's Intel GPU (or IPEX's CPU backend with device "cpu")."""
    return load_ipex_engine(bound_instance.instance.model, device=device, config=config)


def _device(device: str | ComputeDevice) -> ComputeDevice:
    if not isinstance(device, str):
        return device
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return HostDevice()
    if kind == "xpu":
        return open_xpu(index=int(index or 0))
    raise ValueError(f"the ipex engine runs on 'xpu', 'xpu:N' or 'cpu' (IPEX's CPU backend), not {device!r}")
