"""This node's hardware and engines, as the typed models of `ringlet.shared.engine_info`.

    collect_node_hardware() -> NodeHardware   (CPU model, cores, AVX-512/AMX flags, RAM, GPUs)
    collect_engine_info()   -> EngineInfo     (available engines, reasons and fixes, the chosen one)
    read_memory()           -> MemoryInfo     (RAM now: placement counts free memory)
    refresh_gpu_memory(hw)  -> NodeHardware   (the GPUs' free memory now)
    recommended_extras(...) -> InstallAdvice  (what to pip install for this hardware, in order)
"""

from __future__ import annotations

import logging
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ringlet.shared.engine_info import CpuInfo, EngineInfo, GpuInfo, IntelGpuInfo, NodeHardware
from ringlet.shared.state import MemoryInfo
from ringlet.worker.engines.engine_utils import (
    INTEL_VENDOR,
    IPEX_XPU_INSTALL,
    XPU_TORCH_INSTALL,
    EngineUnavailableError,
    ProbeInputs,
    detect_available_engines,
    ipex_status,
    level_zero_version,
    pci_display_devices,
    select_best_engine,
    xpu_devices,
    xpu_free_bytes,
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
    devices = xpu_devices(inputs)
    if not devices:
        return IntelGpuInfo(available=False, ipex_version=ipex_status().version, pci_devices=pci)
    return IntelGpuInfo(
        available=True, count=len(devices), total_memory=sum(d.total_bytes for d in devices),
        device_name=devices[0].name, driver_version=devices[0].driver_version,
        ipex_version=ipex_status().version, pci_devices=pci,
    )


def _intel_gpus(inputs: ProbeInputs) -> list[GpuInfo]:
    devices = xpu_devices(inputs)
    level_zero = level_zero_version(inputs.library_dirs) if devices else None
    return [GpuInfo(vendor="intel", index=d.index, name=d.name, memory_total_bytes=d.total_bytes,
                    memory_free_bytes=d.free_bytes, driver=d.driver_version, integrated=d.integrated,
                    level_zero_version=level_zero) for d in devices]


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
                                driver=driver if isinstance(driver, str) else driver.decode(),
                                nvlink=_nvlink_up(pynvml, handle)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _nvlink_up(pynvml: Any, handle: Any) -> bool | None:
    """Whether any NVLink of the GPU is up (how its tensor-parallel peers reach it); None where NVML cannot say."""
    try:
        links = int(pynvml.NVML_NVLINK_MAX_LINKS)
    except AttributeError:
        return None
    for link in range(links):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED:
                return True
        except pynvml.NVMLError:  # no such link (a GPU without NVLink answers "not supported")
            continue
    return False


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
                          memory_free_bytes=int(memory.available), driver="Metal", integrated=True)]


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


def refresh_gpu_memory(hardware: NodeHardware, inputs: ProbeInputs | None = None) -> NodeHardware:
    """`hardware` with each GPU's free memory read again (Intel through the guarded torch.xpu query, NVIDIA
    through NVML or torch.cuda, Apple's unified memory as the host's); the same object when nothing moved."""
    vendors = {g.vendor for g in hardware.gpus}
    if not vendors:
        return hardware
    inputs = inputs or ProbeInputs()
    free: dict[tuple[str, int], int | None] = {}
    if "nvidia" in vendors:
        free |= {("nvidia", g.index): g.memory_free_bytes for g in get_nvidia_gpus()}
    if "intel" in vendors and inputs.xpu is not None and inputs.xpu.built_with_xpu:
        host = inputs.host_available()
        free |= {("intel", g.index): xpu_free_bytes(inputs.xpu, g.index, host)[0]
                 for g in hardware.gpus if g.vendor == "intel"}
    if "apple" in vendors:
        free[("apple", 0)] = inputs.host_available()
    gpus = [g.model_copy(update={"memory_free_bytes": free[(g.vendor, g.index)]}) if (g.vendor, g.index) in free
            else g for g in hardware.gpus]
    return hardware if gpus == hardware.gpus else hardware.model_copy(update={"gpus": gpus})


def gpu_memory_moved(old: NodeHardware, new: NodeHardware, threshold: int) -> bool:
    """Whether some GPU's free memory moved by `threshold` bytes or more (or became known, or unknown)."""
    before = {(g.vendor, g.index): g.memory_free_bytes for g in old.gpus}
    for gpu in new.gpus:
        was, now = before.get((gpu.vendor, gpu.index)), gpu.memory_free_bytes
        if (was is None) != (now is None) or (was is not None and now is not None and abs(now - was) >= threshold):
            return True
    return False


@dataclass(frozen=True)
class InstallAdvice:
    """A pip extra of ringlet for this hardware, why, and the commands that install it, in order."""

    extra: str
    why: str
    commands: tuple[str, ...]  # each appears verbatim in docs/install.md


CPU_TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def recommended_extras(hardware: NodeHardware, intel: IntelGpuInfo) -> list[InstallAdvice]:
    """The pip extras of ringlet this hardware wants, best first. PyPI's torch has no Intel GPU kernels and an
    extra cannot pick a package index, so for an Intel GPU PyTorch's XPU build comes first, from its own index."""
    vendors = {g.vendor for g in hardware.gpus}
    extras: list[InstallAdvice] = []
    if hardware.apple_chip:
        extras.append(InstallAdvice("mlx", f"{hardware.apple_chip}: MLX on Metal", ("pip install 'ringlet[mlx]'",)))
    if "nvidia" in vendors:
        extras.append(InstallAdvice("cuda", "NVIDIA GPU: PyPI's PyTorch with CUDA, and NVML for GPU memory",
                                    ("pip install 'ringlet[cuda]'",)))
    if intel.available or intel.pci_devices:
        extras.append(InstallAdvice("xpu", "Intel GPU: PyTorch's XPU build from its own index first, then ringlet",
                                    (XPU_TORCH_INSTALL, "pip install 'ringlet[xpu]'")))
        extras.append(InstallAdvice("ipex", "optional, Intel GPU: IPEX 2.8's optimisations on the XPU build of "
                                    "PyTorch 2.8 it was made for (IPEX is retired)", IPEX_XPU_INSTALL))
    if not extras:
        linux_x86 = hardware.system == "Linux" and hardware.machine == "x86_64"
        extras.append(InstallAdvice("cpu", "no GPU: the CPU build of PyTorch (smallest download)",
                                    ((CPU_TORCH_INSTALL,) if linux_x86 else ()) + ("pip install 'ringlet[cpu]'",)))
    return extras


def install_notes(hardware: NodeHardware) -> list[str]:
    """What `ringlet info` adds below the extras: IPEX is never recommended for a CPU, but an AMX CPU may measure it."""
    if not {"amx_bf16", "amx_int8"} & set(hardware.cpu.flags):
        return []
    return [("IPEX's CPU backend is not recommended: it pins PyTorch 2.8, and its int8 decode was slower than the cpu "
             "engine's on a 2-core Xeon with AMX (0.82x; its prefill 2.3x) and far slower on an AMD EPYC "
             "(docs/benchmarks.md). To measure it here: ringlet bench --engine ipex-cpu against ringlet bench --engine "
             "cpu, in an environment with IPEX (docs/install.md, step 6)")]
