"""Which engines can run on this machine, why the others cannot, and which one to use.

Detection never imports IPEX: an Intel GPU is usable when PyTorch's own `torch.xpu` sees it and a tiny
operation on it works (IPEX, when present and version-matched, only adds optimisations). Each probe
takes what it looks at as an argument (the `torch.xpu` surface, the sysfs root), so tests hand in a
fake GPU and a fake PCI tree instead of patching libraries.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ringlet.shared.engine_info import ENGINE_PRIORITY, EngineProblem, EngineStatus
from ringlet.shared.instances import EngineType

__all__ = [
    "ENGINE_PRIORITY", "EngineType", "EngineUnavailableError", "ProbeInputs", "XpuApi", "XpuRuntime",
    "detect_available_engines", "detect_intel_gpu", "pci_display_devices", "select_best_engine",
]

ENGINE_ENV = "RINGLET_ENGINE"  # read by the CLI (`--engine`'s default), never here
ENGINE_ALIASES: dict[str, EngineType] = {"xpu": "ipex", "intel": "ipex", "metal": "mlx", "torch": "cpu"}
INTEL_VENDOR, NVIDIA_VENDOR = "0x8086", "0x10de"
IPEX_DISTRIBUTION = "intel-extension-for-pytorch"
XPU_WHEEL_FIX = ("install a PyTorch build with XPU support: pip install 'ringlet[xpu]' "
                 "(or pip install torch --index-url https://download.pytorch.org/whl/xpu)")
LEVEL_ZERO_FIX = ("install Intel's GPU compute runtime with Level Zero (Debian/Ubuntu: apt install "
                  "intel-opencl-icd libze1 libze-intel-gpu1), then add your user to the 'render' group")


class XpuApi(Protocol):
    """The part of `torch.xpu` that ringlet uses; `torch.xpu` itself satisfies it."""

    def is_available(self) -> bool: ...
    def device_count(self) -> int: ...
    def get_device_properties(self, device: int) -> Any: ...  # .name, .total_memory, .driver_version
    def mem_get_info(self, device: int) -> tuple[int, int]: ...  # (free, total) bytes
    def synchronize(self, device: int) -> None: ...
    def empty_cache(self) -> None: ...


@dataclass(frozen=True)
class XpuRuntime:
    """torch.xpu plus where its tensors live. A test's fake API keeps its tensors on the CPU."""

    api: XpuApi
    built_with_xpu: bool = True  # False: a CPU or CUDA build of PyTorch, whose torch.xpu never sees a device
    device_type: str = "xpu"

    @classmethod
    def native(cls) -> XpuRuntime | None:
        if not hasattr(torch, "xpu"):  # PyTorch before 2.4
            return None
        return cls(torch.xpu, built_with_xpu=getattr(torch.version, "xpu", None) is not None)

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu") if self.device_type == "cpu" else torch.device(self.device_type, index)


@dataclass(frozen=True)
class ProbeInputs:
    """What detection looks at; the defaults are this machine."""

    xpu: XpuRuntime | None = field(default_factory=XpuRuntime.native)
    sysfs_root: Path = Path("/sys")
    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)


class EngineUnavailableError(RuntimeError):
    """An engine was asked for (by name, or by an instance) that cannot run on this node."""

    def __init__(self, message: str, engine: str | None = None, problem: EngineProblem | None = None) -> None:
        super().__init__(message)
        self.engine, self.problem = engine, problem


# ---- IPEX: optional, and usable only with the torch it was built for --------------------------------------

@dataclass(frozen=True)
class IpexStatus:
    """Whether IPEX can be used with this torch, found from package metadata without importing it."""

    version: str | None
    usable: bool
    reason: str = ""


def _major_minor(version: str) -> str:
    match = re.match(r"(\d+\.\d+)", version)
    return match.group(1) if match else version


def ipex_status() -> IpexStatus:
    try:
        version = importlib.metadata.version(IPEX_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return IpexStatus(None, False, "intel-extension-for-pytorch is not installed")
    # IPEX refuses (on import, by exiting) any torch but the one it was built for: check first.
    if _major_minor(version) != _major_minor(torch.__version__):
        return IpexStatus(version, False, f"intel-extension-for-pytorch {version} needs PyTorch "
                          f"{_major_minor(version)}.*, but this is PyTorch {torch.__version__}")
    return IpexStatus(version, True)


# ---- PCI bus (sysfs): sees a GPU even when PyTorch or the driver cannot ---------------------------------

@dataclass(frozen=True)
class PciDevice:
    address: str
    vendor: str
    device: str
    kernel_driver: str | None

    def __str__(self) -> str:
        driver = f" ({self.kernel_driver})" if self.kernel_driver else " (no kernel driver bound)"
        return f"{self.address} {self.vendor.removeprefix('0x')}:{self.device.removeprefix('0x')}{driver}"


def pci_display_devices(vendor: str, sysfs_root: Path = Path("/sys")) -> list[PciDevice]:
    """Display-class PCI devices (class 0x03xxxx) of one vendor, e.g. "0x8086" for Intel."""
    found = []
    root = sysfs_root / "bus" / "pci" / "devices"
    for dev in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            dev_vendor = (dev / "vendor").read_text().strip().lower()
            dev_class = (dev / "class").read_text().strip().lower()
            dev_id = (dev / "device").read_text().strip().lower()
        except OSError:
            continue  # a device that vanished while we looked, or an unreadable entry: not a GPU we can use
        if dev_vendor == vendor and dev_class.startswith("0x03"):
            driver = dev / "driver"
            found.append(PciDevice(dev.name, dev_vendor, dev_id, driver.resolve().name if driver.exists() else None))
    return found


# ---- probes, one per engine ------------------------------------------------------------------------------

def _problem(engine: EngineType, reason: str, fix: str) -> EngineStatus:
    return EngineStatus(engine=engine, available=False, problem=EngineProblem(reason=reason, fix=fix))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def probe_ipex(inputs: ProbeInputs) -> EngineStatus:
    """An Intel GPU through torch.xpu: available, counted, and a tiny operation on device 0 works."""
    pci = pci_display_devices(INTEL_VENDOR, inputs.sysfs_root)
    on_bus = f"Intel GPU found on the PCI bus ({pci[0]})" if pci else ""
    xpu = inputs.xpu
    if xpu is None or not xpu.built_with_xpu:
        if pci:
            return _problem("ipex", f"{on_bus} but this PyTorch ({torch.__version__}) has no XPU support",
                            XPU_WHEEL_FIX)
        return _problem("ipex", "no Intel GPU (none on the PCI bus, and this PyTorch has no XPU support)",
                        "needs an Intel Arc or Data Center GPU; on such a machine: pip install 'ringlet[xpu]'")
    if not xpu.api.is_available() or xpu.api.device_count() == 0:
        if pci:
            return _problem("ipex", f"{on_bus} but torch.xpu sees no device: the Level Zero driver is missing "
                            "or cannot open the GPU", LEVEL_ZERO_FIX)
        return _problem("ipex", "no Intel GPU: torch.xpu sees no device and none is on the PCI bus",
                        "needs an Intel Arc or Data Center GPU")
    try:
        x = torch.arange(4, dtype=torch.float32, device=xpu.device(0))
        total = float((x * 2).sum().item())
        xpu.api.synchronize(0)
    except RuntimeError as e:  # the SYCL runtime reports driver/device failures as RuntimeError
        return _problem("ipex", f"torch.xpu sees an Intel GPU but a test operation on xpu:0 failed: {e}",
                        "update the Intel GPU driver to one that matches this PyTorch; " + LEVEL_ZERO_FIX)
    if total != 12.0:
        return _problem("ipex", f"a test operation on xpu:0 returned {total} instead of 12.0",
                        "the GPU or its driver computes wrong results: update the driver")
    count = xpu.api.device_count()
    props = xpu.api.get_device_properties(0)
    return EngineStatus(engine="ipex", available=True,
                        detail=f"{count}x {props.name}, {_gib(int(props.total_memory))} each")


def detect_intel_gpu(inputs: ProbeInputs | None = None) -> bool:
    """True when an Intel GPU is usable through torch.xpu (no IPEX needed); see probe_ipex for why not."""
    return probe_ipex(inputs or ProbeInputs()).available


def probe_cuda(inputs: ProbeInputs) -> EngineStatus:
    pci = pci_display_devices(NVIDIA_VENDOR, inputs.sysfs_root)
    if torch.version.cuda is None:
        if pci:
            return _problem("cuda", f"NVIDIA GPU found on the PCI bus ({pci[0]}) but this PyTorch "
                            f"({torch.__version__}) has no CUDA support", "pip install 'ringlet[cuda]'")
        return _problem("cuda", f"no NVIDIA GPU, and this PyTorch ({torch.__version__}) has no CUDA support",
                        "needs an NVIDIA GPU; on such a machine: pip install 'ringlet[cuda]'")
    if not torch.cuda.is_available():
        if pci:
            return _problem("cuda", f"NVIDIA GPU found on the PCI bus ({pci[0]}) but CUDA cannot use it",
                            "install or update the NVIDIA driver (nvidia-smi must list the GPU)")
        return _problem("cuda", "no NVIDIA GPU visible to CUDA", "needs an NVIDIA GPU and its driver")
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    return EngineStatus(engine="cuda", available=True, detail=f"{count}x {props.name}, {_gib(props.total_memory)} each")


def probe_mlx(inputs: ProbeInputs) -> EngineStatus:
    apple_silicon = inputs.system == "Darwin" and inputs.machine == "arm64"
    missing = [m for m in ("mlx", "mlx_lm") if importlib.util.find_spec(m) is None]
    if missing:
        if apple_silicon:
            return _problem("mlx", f"{' and '.join(missing)} not installed", "pip install 'ringlet[mlx]'")
        return _problem("mlx", "MLX runs on Apple Silicon (Metal); this is not one",
                        "on a Mac with Apple Silicon: pip install 'ringlet[mlx]' (on Linux, "
                        "pip install mlx mlx-cpu mlx-lm runs it on the CPU, slower than the cpu engine)")
    try:
        import mlx.core as mx
    except ImportError as e:  # e.g. mlx without its mlx-cpu / mlx-metal backend library
        return _problem("mlx", f"mlx is installed but does not import: {e}",
                        "pip install 'ringlet[mlx]' (on Linux also mlx-cpu)")
    if mx.metal.is_available():
        return EngineStatus(engine="mlx", available=True, detail="MLX on Metal")
    # Usable when asked for (tests, comparisons) but never chosen over the torch engines.
    return EngineStatus(engine="mlx", available=True, auto_select=False, detail="MLX on CPU (no Metal)")


def probe_cpu(inputs: ProbeInputs) -> EngineStatus:
    return EngineStatus(engine="cpu", available=True, detail=f"PyTorch {torch.__version__}, "
                        f"{torch.get_num_threads()} threads")


PROBES = {"mlx": probe_mlx, "ipex": probe_ipex, "cuda": probe_cuda, "cpu": probe_cpu}


def detect_available_engines(inputs: ProbeInputs | None = None) -> list[EngineStatus]:
    """Every engine in priority order, each available or with the reason and the fix."""
    inputs = inputs or ProbeInputs()
    return [PROBES[name](inputs) for name in ENGINE_PRIORITY]


# ---- selection -------------------------------------------------------------------------------------------

def parse_engine_name(name: str) -> EngineType | None:
    """"auto" gives None; an alias gives its engine; anything else is an error listing the names."""
    key = name.strip().lower()
    if key in ("", "auto"):
        return None
    key = ENGINE_ALIASES.get(key, key)
    for engine in ENGINE_PRIORITY:
        if engine == key:
            return engine
    raise ValueError(f"unknown engine {name!r}; known: auto, {', '.join(ENGINE_PRIORITY)}")


def select_best_engine(requested: str | None = None, statuses: Sequence[EngineStatus] | None = None) -> EngineType:
    """`requested` (--engine, or $RINGLET_ENGINE as the CLI reads it) or the best available: MLX (Metal) > IPEX >
    CUDA > CPU."""
    wanted = parse_engine_name(requested or "auto")
    statuses = detect_available_engines() if statuses is None else statuses
    available = [s.engine for s in statuses if s.available]
    if wanted is None:
        for status in sorted(statuses, key=lambda s: ENGINE_PRIORITY.index(s.engine)):
            if status.available and status.auto_select:
                return status.engine
        reasons = "; ".join(f"{s.engine}: {s.problem.reason}" for s in statuses if s.problem)
        raise EngineUnavailableError(f"no engine can run on this machine ({reasons})")
    chosen = next((s for s in statuses if s.engine == wanted), None)
    if chosen is None or not chosen.available:
        problem = chosen.problem if chosen else None
        why = f": {problem.reason}; fix: {problem.fix}" if problem else ""
        raise EngineUnavailableError(
            f"engine {wanted!r} is not available here{why}. Available here: {', '.join(available) or 'none'}",
            engine=wanted, problem=problem,
        )
    return wanted


def fallback_engine(failed: EngineType, statuses: Sequence[EngineStatus]) -> EngineType:
    """The next engine after `failed` in priority order that is available and auto-selectable; cpu last."""
    later = ENGINE_PRIORITY[ENGINE_PRIORITY.index(failed) + 1:]
    for status in statuses:
        if status.engine in later and status.available and status.auto_select:
            return status.engine
    return "cpu"
