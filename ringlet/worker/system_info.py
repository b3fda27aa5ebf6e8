"""This node's hardware and engines, as the typed models of `ringlet.shared.engine_info`.

    collect_node_hardware() -> NodeHardware   (CPU model, cores, AVX-512/AMX flags, RAM, GPUs)
    collect_engine_info()   -> EngineInfo     (available engines, reasons and fixes, the chosen one)
    read_memory()           -> MemoryInfo     (RAM now: placement counts free memory)
"""

from __future__ import annotations

import logging
import platform
import re
import subprocess
from pathlib import Path

import psutil

from ringlet.shared.engine_info import CpuInfo, EngineInfo, GpuInfo, IntelGpuInfo, NodeHardware
from ringlet.shared.state import MemoryInfo
from ringlet.worker.engines.engine_utils import (
    INTEL_VENDOR,
    EngineUnavailableError,
    ProbeInputs,
    detect_available_engines,
    ipex_status,
    pci_display_devices,
    select_best_engine,
)

log = logging.getLogger(__name__)

# CPU features that decide how fast (and in which precision) a CPU runs a model
INFERENCE_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def read_memory() -> MemoryInfo:
    memory = psutil.virtual_memory()
    return MemoryInfo(total_bytes=memory.total, available_bytes=memory.available)


def get_intel_gpu_info(inputs: ProbeInputs | None = None) -> IntelGpuInfo:
    """Intel GPUs through torch.xpu (no IPEX needed), and what the PCI bus shows regardless."""
    inputs = inputs or ProbeInputs()
    pci = [str(d) for d in pci_display_devices(INTEL_VENDOR, inputs.sysfs_root)]
    xpu = inputs.xpu
    if xpu is None or not xpu.built_with_xpu or not xpu.api.is_available() or xpu.api.device_count() == 0:
        return IntelGpuInfo(available=False, ipex_version=ipex_status().version, pci_devices=pci)
    count = xpu.api.device_count()
    props = [xpu.api.get_device_properties(i) for i in range(count)]
    return IntelGpuInfo(
        available=True, count=count, total_memory=sum(int(p.total_memory) for p in props),
        device_name=str(props[0].name), driver_version=getattr(props[0], "driver_version", None),
        ipex_version=ipex_status().version, pci_devices=pci,
    )


def _intel_gpus(inputs: ProbeInputs) -> list[GpuInfo]:
    xpu = inputs.xpu
    if xpu is None or not xpu.built_with_xpu or not xpu.api.is_available():
        return []
    gpus = []
    for i in range(xpu.api.device_count()):
        props = xpu.api.get_device_properties(i)
        free, total = xpu.api.mem_get_info(i)
        gpus.append(GpuInfo(vendor="intel", index=i, name=str(props.name), memory_total_bytes=int(total),
                            memory_free_bytes=int(free), driver=getattr(props, "driver_version", None)))
    return gpus


def get_nvidia_gpus() -> list[GpuInfo]:
    """Through NVML (nvidia-ml-py) when installed: it needs no CUDA context. Else through torch.cuda."""
    try:
        import pynvml
    except ImportError:
        return _nvidia_gpus_from_torch()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no driver: the normal case on a machine without an NVIDIA GPU
        log.debug("NVML unavailable: %s", e)
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(GpuInfo(vendor="nvidia", index=i, name=name if isinstance(name, str) else name.decode(),
                                memory_total_bytes=int(memory.total), memory_free_bytes=int(memory.free),
                                driver=driver if isinstance(driver, str) else driver.decode()))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _nvidia_gpus_from_torch() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GpuInfo(vendor="nvidia", index=i, name=torch.cuda.get_device_name(i),
                            memory_total_bytes=int(total), memory_free_bytes=int(free),
                            driver=f"CUDA {torch.version.cuda}"))
    return gpus


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def get_apple_info() -> tuple[str | None, list[GpuInfo]]:
    """(chip name, its GPU) on Apple Silicon: the GPU shares the machine's unified memory."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None, []
    chip = _sysctl("machdep.cpu.brand_string") or "Apple Silicon"
    memory = psutil.virtual_memory()
    return chip, [GpuInfo(vendor="apple", index=0, name=f"{chip} GPU", memory_total_bytes=int(memory.total),
                          memory_free_bytes=int(memory.available), driver="Metal")]


def _cpu_model_and_flags(cpuinfo: Path) -> tuple[str, set[str]]:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux
        return _sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine(), set()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    return (model.group(1).strip() if model else platform.machine()), set(flags.group(1).split() if flags else ())


def get_cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    model, flags = _cpu_model_and_flags(cpuinfo)
    memory = psutil.virtual_memory()
    logical = psutil.cpu_count(logical=True) or 1
    return CpuInfo(model=model, physical_cores=psutil.cpu_count(logical=False) or logical, logical_cores=logical,
                   flags=[f for f in INFERENCE_FLAGS if f in flags],
                   ram_total_bytes=int(memory.total), ram_available_bytes=int(memory.available))


def collect_node_hardware(inputs: ProbeInputs | None = None) -> NodeHardware:
    inputs = inputs or ProbeInputs()
    chip, apple_gpus = get_apple_info()
    return NodeHardware(system=platform.system(), machine=platform.machine(), cpu=get_cpu_info(),
                        gpus=apple_gpus + get_nvidia_gpus() + _intel_gpus(inputs), apple_chip=chip)


def collect_engine_info(requested: str | None = None, inputs: ProbeInputs | None = None) -> EngineInfo:
    """Engines in priority order with reasons for the missing ones, and the one `requested` resolves to
    (None if it cannot run here: the reason is in `reasons`)."""
    inputs = inputs or ProbeInputs()
    statuses = detect_available_engines(inputs)
    try:
        selected = select_best_engine(requested, statuses)
    except EngineUnavailableError:
        selected = None
    intel = get_intel_gpu_info(inputs)
    by_name = {s.engine: s for s in statuses}
    return EngineInfo(
        available_engines=[s.engine for s in statuses if s.available],
        selected_engine=selected,
        mlx_available=by_name["mlx"].available, torch_available=True, cpu_available=by_name["cpu"].available,
        cuda_available=by_name["cuda"].available, ipex_available=by_name["ipex"].available,
        intel_gpu_count=intel.count, intel_gpu_memory=intel.total_memory, ipex_version=intel.ipex_version,
        reasons={s.engine: s.problem for s in statuses if s.problem is not None},
        notes={s.engine: s.detail for s in statuses if s.available and not s.auto_select},
    )


def recommended_extras(hardware: NodeHardware, intel: IntelGpuInfo) -> list[tuple[str, str]]:
    """The pip extras of ringlet this hardware wants, best first, each with why."""
    vendors = {g.vendor for g in hardware.gpus}
    extras: list[tuple[str, str]] = []
    if hardware.apple_chip:
        extras.append(("mlx", f"{hardware.apple_chip}: MLX on Metal"))
    if "nvidia" in vendors:
        extras.append(("cuda", "NVIDIA GPU: PyTorch with CUDA"))
    if intel.available or intel.pci_devices:
        extras.append(("xpu", "Intel GPU: PyTorch's native XPU support"))
        extras.append(("ipex", "optional, Intel GPU: IPEX 2.8 optimisations (pins PyTorch 2.8; IPEX is retired)"))
    if not extras:
        extras.append(("cpu", "no GPU: the CPU build of PyTorch (smallest download)"))
        if {"amx_bf16", "avx512_bf16"} & set(hardware.cpu.flags):
            why = "optional: IPEX's CPU backend for this CPU's AMX/AVX-512 BF16 (pins PyTorch 2.8; see the README)"
            extras.append(("ipex", why))
    return extras
