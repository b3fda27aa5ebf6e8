"""Which engines can run on this machine, why the others cannot, and which one to use.

Detection never imports IPEX: an Intel GPU is usable when PyTorch's own `torch.xpu` sees it and a tiny
operation on it works (IPEX, when present and version-matched, only adds optimisations). Each probe
takes what it looks at as an argument (the `torch.xpu` surface, the sysfs root, the library folders),
so tests hand in a fake GPU and a fake PCI tree instead of patching libraries.

Every torch.xpu query goes through the guarded `xpu_*` helpers below: a driver error or a PyTorch too old
for a call gives a fallback value and one log line per device and process, never an exception.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch

from ringlet.shared.engine_info import ENGINE_PRIORITY, EngineProblem, EngineStatus
from ringlet.shared.instances import EngineType

__all__ = [
    "ENGINE_PRIORITY", "EngineType", "EngineUnavailableError", "ProbeInputs", "XpuApi", "XpuDeviceReport",
    "XpuRuntime", "detect_available_engines", "detect_intel_gpu", "level_zero_version", "pci_display_devices",
    "select_best_engine", "xpu_device_count", "xpu_devices", "xpu_free_bytes",
]

log = logging.getLogger(__name__)

ENGINE_ENV = "RINGLET_ENGINE"  # read by the CLI (`--engine`'s default), never here
ENGINE_ALIASES: dict[str, EngineType] = {"xpu": "ipex", "intel": "ipex", "metal": "mlx", "torch": "cpu"}
INTEL_VENDOR, NVIDIA_VENDOR = "0x8086", "0x10de"
IPEX_DISTRIBUTION = "intel-extension-for-pytorch"
# Every `pip install ...` in these fixes appears verbatim in docs/install.md (tests/worker/engines/test_advice.py).
XPU_TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/xpu"
XPU_WHEEL_FIX = ("replace it with PyTorch's XPU build (PyPI's torch has no Intel GPU kernels, and ringlet's [xpu] "
                 "extra cannot choose the index): pip install --force-reinstall torch --index-url "
                 "https://download.pytorch.org/whl/xpu")
XPU_FRESH_FIX = f"{XPU_TORCH_INSTALL}, then pip install 'ringlet[xpu]'"
# IPEX on an Intel GPU, in docs/install.md's order: the XPU build of torch 2.8, IPEX's XPU wheel, then the extra (IPEX
# 2.8 is its last release; PyPI's torch would replace the XPU build with one that cannot see the GPU)
IPEX_XPU_INSTALL = (
    "pip install torch==2.8.0 --index-url https://download.pytorch.org/whl/xpu",
    ("pip install intel-extension-for-pytorch==2.8.10+xpu "
     "--extra-index-url https://pytorch-extension.intel.com/release-whl/stable/xpu/us/"),
    "pip install 'ringlet[ipex]'",
)
LEVEL_ZERO_FIX = ("install Intel's GPU compute runtime with Level Zero (Debian/Ubuntu: apt install "
                  "intel-opencl-icd libze1 libze-intel-gpu1), then add your user to the 'render' group")


class XpuApi(Protocol):
    """The part of `torch.xpu` that ringlet uses; `torch.xpu` itself satisfies it. Two more calls are used where
    they exist, through `getattr`: `mem_get_info(device) -> (free, total)` (PyTorch 2.6 and newer) and
    `memory_reserved(device) -> int`."""

    def is_available(self) -> bool: ...
    def device_count(self) -> int: ...
    def get_device_properties(self, device: int) -> Any: ...  # .name, .total_memory, .driver_version
    def synchronize(self, device: int) -> None: ...
    def empty_cache(self) -> None: ...


@dataclass(frozen=True)
class XpuRuntime:
    """torch.xpu plus where its tensors live. A test's fake API keeps its tensors on the CPU."""

    api: XpuApi
    built_with_xpu: bool = True  # False: a CPU or CUDA build of PyTorch, whose torch.xpu never sees a device
    device_type: str = "xpu"
    # (query, device) pairs whose fallback was logged: one line per process and device, not one per refresh
    warned: set[tuple[str, int]] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def native(cls) -> XpuRuntime | None:
        return _native_xpu_runtime()

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu") if self.device_type == "cpu" else torch.device(self.device_type, index)

    def warn_once(self, query: str, index: int, message: str) -> None:
        if (query, index) not in self.warned:
            self.warned.add((query, index))
            log.warning("%s", message)


@functools.cache
def _native_xpu_runtime() -> XpuRuntime | None:
    """One per process, so that its fallbacks are logged once however often the node refreshes."""
    if not hasattr(torch, "xpu"):  # PyTorch before 2.4
        return None
    return XpuRuntime(torch.xpu, built_with_xpu=getattr(torch.version, "xpu", None) is not None)


LIBRARY_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib"))


def _host_available_bytes() -> int:
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class ProbeInputs:
    """What detection looks at; the defaults are this machine."""

    xpu: XpuRuntime | None = field(default_factory=XpuRuntime.native)
    sysfs_root: Path = Path("/sys")
    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)
    library_dirs: tuple[Path, ...] = LIBRARY_DIRS  # where the Level Zero loader's library is looked for
    host_available: Callable[[], int] = _host_available_bytes  # RAM free now: an integrated GPU's bound


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


# ---- torch.xpu, guarded: a driver error or an older PyTorch gives a fallback and one log line -------------

@dataclass(frozen=True)
class XpuDeviceReport:
    """One Intel GPU as torch.xpu reports it; `note` says why a figure is a fallback (None: all were read)."""

    index: int
    name: str
    total_bytes: int  # 0 where neither the properties nor mem_get_info could be read
    free_bytes: int
    integrated: bool | None  # shares the host's RAM; None: not known
    driver_version: str | None
    note: str | None = None


# How torch.xpu's queries fail: RuntimeError from the driver (SYCL, Level Zero), AssertionError from the lazy
# initialisation of a PyTorch that cannot start XPU, OSError for a missing library, ValueError for a bad index.
XPU_QUERY_ERRORS: tuple[type[Exception], ...] = (RuntimeError, AssertionError, OSError, ValueError)


def xpu_device_count(runtime: XpuRuntime) -> tuple[int, str | None]:
    """How many devices torch.xpu sees, and the error when it could not say (then 0)."""
    try:
        return (runtime.api.device_count() if runtime.api.is_available() else 0), None
    except XPU_QUERY_ERRORS as e:
        runtime.warn_once("device_count", -1, f"torch.xpu could not count its devices ({e}); counting none")
        return 0, str(e)


def xpu_properties(runtime: XpuRuntime, index: int) -> Any | None:
    """torch.xpu.get_device_properties(index), or None (logged once) when the driver cannot answer."""
    try:
        return runtime.api.get_device_properties(index)
    except XPU_QUERY_ERRORS as e:
        runtime.warn_once("get_device_properties", index, f"xpu:{index}: torch.xpu.get_device_properties failed "
                          f"({e}); its name, driver and memory are reported as unknown")
        return None


# Names of integrated Intel GPUs: "Intel(R) Graphics", "Intel(R) UHD Graphics 770", "Intel(R) Iris(R) Xe Graphics",
# and Core Ultra's "Intel(R) Arc(TM) Graphics" (no model number). Discrete ones carry a model number or a data
# centre line: "Intel(R) Arc(TM) A770 Graphics", "Intel(R) Arc(TM) Pro B60 Graphics", "Intel(R) Data Center GPU
# Max 1550", "... Flex 170". A heuristic: used only where the properties lack is_integrated_gpu (PyTorch < 2.9).
_INTEGRATED_NAME = re.compile(r"Intel\(R\) (?:UHD |Iris\(R\) Xe |Iris\(R\) |HD |Arc\(TM\) )?Graphics\b", re.IGNORECASE)
_DISCRETE_NAME = re.compile(r"Data Center GPU|Arc\(TM\) (?:Pro )?[AB]\d{2,3}\b", re.IGNORECASE)


def xpu_is_integrated(props: Any) -> bool | None:
    """Whether the device shares the host's memory: the properties' own flag where PyTorch has one, else the
    name (see _INTEGRATED_NAME); None when neither tells."""
    for attr in ("is_integrated_gpu", "is_integrated", "integrated"):
        flag = getattr(props, attr, None)
        if isinstance(flag, bool | int):
            return bool(flag)
    name = str(getattr(props, "name", ""))
    if _DISCRETE_NAME.search(name):
        return False
    if _INTEGRATED_NAME.search(name):
        return True
    return None


def _reserved_bytes(runtime: XpuRuntime, index: int) -> int:
    query = getattr(runtime.api, "memory_reserved", None)
    if query is None:
        return 0
    try:
        return int(query(index))
    except XPU_QUERY_ERRORS as e:
        runtime.warn_once("memory_reserved", index, f"xpu:{index}: torch.xpu.memory_reserved failed ({e}); "
                          "counting nothing reserved")
        return 0


def _memory(runtime: XpuRuntime, index: int, props: Any | None, host_available: int) -> tuple[int, int, str | None]:
    """(free, total, why free is a fallback) of xpu:`index`, given its properties (None: unreadable)."""
    total = int(getattr(props, "total_memory", 0) or 0)
    integrated = xpu_is_integrated(props) if props is not None else None
    query = getattr(runtime.api, "mem_get_info", None)
    note = None
    if query is None:
        note = "this PyTorch has no torch.xpu.mem_get_info (it came in 2.6)"
    else:
        try:
            free, reported_total = (int(n) for n in query(index))
            total = total or reported_total
        except XPU_QUERY_ERRORS as e:
            note = f"torch.xpu.mem_get_info failed ({e})"
    if note is not None:
        free = max(total - _reserved_bytes(runtime, index), 0)
        bound = ", at most the host's available RAM (an integrated GPU's memory)" if integrated else ""
        runtime.warn_once("mem_get_info", index, f"xpu:{index}: {note}; its free memory is taken as its total "
                          f"less what this process reserved{bound}")
    free = min(free, total) if total else free  # a driver's figure above the total is not believed
    if integrated:
        free = min(free, host_available)
    return max(free, 0), total, note


def xpu_free_bytes(runtime: XpuRuntime, index: int, host_available: int) -> tuple[int, str | None]:
    """Free memory of xpu:`index` in bytes, and why it is a fallback (None: mem_get_info answered).

    mem_get_info exists from PyTorch 2.6 and raises on some integrated GPUs; without it the free memory is the
    total less what this process's allocator reserved. An integrated GPU's memory is the host's RAM, so its free
    memory is at most `host_available`."""
    free, _, note = _memory(runtime, index, xpu_properties(runtime, index), host_available)
    return free, note


def xpu_device_report(runtime: XpuRuntime, index: int, host_available: int) -> XpuDeviceReport:
    props = xpu_properties(runtime, index)
    free, total, note = _memory(runtime, index, props, host_available)
    if props is None:
        return XpuDeviceReport(index=index, name=f"Intel GPU xpu:{index}", total_bytes=total, free_bytes=free,
                               integrated=None, driver_version=None,
                               note="; ".join(filter(None, ["torch.xpu.get_device_properties failed", note])))
    driver = getattr(props, "driver_version", None)
    return XpuDeviceReport(index=index, name=str(props.name), total_bytes=total, free_bytes=free,
                           integrated=xpu_is_integrated(props), driver_version=str(driver) if driver else None,
                           note=note)


def xpu_devices(inputs: ProbeInputs) -> list[XpuDeviceReport]:
    """Every Intel GPU torch.xpu sees, each with the figures it could read (empty: none, or no XPU build)."""
    xpu = inputs.xpu
    if xpu is None or not xpu.built_with_xpu:
        return []
    count, _ = xpu_device_count(xpu)
    host_available = inputs.host_available() if count else 0
    return [xpu_device_report(xpu, i, host_available) for i in range(count)]


_LOADER = re.compile(r"libze_loader\.so\.(\d+\.\d+\.\d+)")


def level_zero_version(library_dirs: Sequence[Path]) -> str | None:
    """The Level Zero loader's version, from its library's file name (libze_loader.so.1.21.9) in the first of
    `library_dirs` that has one; None where none is found (e.g. a Nix store path)."""
    for folder in library_dirs:
        try:
            names = [p.name for p in folder.glob("libze_loader.so.*")]
        except OSError:
            continue
        versions = [m.group(1) for n in names if (m := _LOADER.fullmatch(n))]
        if versions:
            return max(versions, key=lambda v: tuple(int(part) for part in v.split(".")))
    return None


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
                        f"needs an Intel Arc or Data Center GPU; on such a machine: {XPU_FRESH_FIX}")
    count, error = xpu_device_count(xpu)
    if error is not None:
        where = on_bus or "torch.xpu is built in"
        return _problem("ipex", f"{where} but torch.xpu failed to count its devices ({error}): the Level Zero "
                        "driver is missing or broken", LEVEL_ZERO_FIX)
    if count == 0:
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
    return EngineStatus(engine="ipex", available=True, detail=describe_xpu_devices(xpu_devices(inputs)))


def describe_xpu_devices(devices: Sequence[XpuDeviceReport]) -> str:
    """"2x Intel(R) Arc(TM) A770 Graphics, 16.0 GiB each; 1x Intel(R) Arc(TM) Graphics, 7.6 GiB each (integrated)"."""
    groups: dict[tuple[str, int, bool | None], int] = {}
    for d in devices:
        groups[(d.name, d.total_bytes, d.integrated)] = groups.get((d.name, d.total_bytes, d.integrated), 0) + 1
    return "; ".join(f"{n}x {name}, {_gib(total)} each" + (" (integrated)" if integrated else "")
                     for (name, total, integrated), n in groups.items())


def detect_intel_gpu(inputs: ProbeInputs | None = None) -> bool:
    """True when an Intel GPU is usable through torch.xpu (no IPEX needed); see probe_ipex for why not."""
    return probe_ipex(inputs or ProbeInputs()).available


def probe_cuda(inputs: ProbeInputs) -> EngineStatus:
    pci = pci_display_devices(NVIDIA_VENDOR, inputs.sysfs_root)
    if torch.version.cuda is None:
        if pci:
            return _problem("cuda", f"NVIDIA GPU found on the PCI bus ({pci[0]}) but this PyTorch "
                            f"({torch.__version__}) has no CUDA support",
                            "replace it with PyTorch's CUDA build: pip install --force-reinstall torch (PyPI's torch "
                            "for Linux x86_64 includes CUDA), then pip install 'ringlet[cuda]'")
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
                        "on a Mac with Apple Silicon: pip install 'ringlet[mlx]' (on Linux the same extra runs "
                        "MLX on the CPU, slower than the cpu engine)")
    try:
        import mlx.core as mx
    except ImportError as e:  # e.g. mlx without its mlx-cpu / mlx-metal backend library
        return _problem("mlx", f"mlx is installed but does not import: {e}",
                        "on Linux, MLX's CPU back end: pip install 'mlx[cpu]'; on a Mac: pip install 'ringlet[mlx]'")
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
