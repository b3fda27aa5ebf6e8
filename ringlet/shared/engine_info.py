"""What a node can run: its hardware and its engines, as typed messages (no detection code here).

Detection lives in `ringlet.worker.engine_utils` / `ringlet.worker.system_info`; these models are what
it reports, so that the API, the master and the dashboard read one shape.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ringlet.shared.instances import EngineType

# Auto-selection order (DESIGN.md, Engines): MLX on Metal, then Intel GPU, then NVIDIA, then CPU.
ENGINE_PRIORITY: tuple[EngineType, ...] = ("mlx", "ipex", "cuda", "cpu")


class EngineProblem(BaseModel):
    """Why an engine cannot run here, and what to do about it."""

    model_config = ConfigDict(frozen=True)

    reason: str
    fix: str


class EngineStatus(BaseModel):
    """One engine as detected on this node."""

    model_config = ConfigDict(frozen=True)

    engine: EngineType
    available: bool
    detail: str = ""  # what it would run on, e.g. "Intel(R) Arc(TM) A770, 16.0 GiB" or "CPU, 16 threads"
    problem: EngineProblem | None = None  # set exactly when not available
    auto_select: bool = True  # False: usable when asked for, never picked by "auto" (mlx without Metal)


class EngineInfo(BaseModel):
    """The seed's EngineInfo, plus the reasons and fixes for each missing engine."""

    model_config = ConfigDict(frozen=True)

    available_engines: list[EngineType]
    selected_engine: EngineType | None
    mlx_available: bool
    torch_available: bool
    cpu_available: bool
    cuda_available: bool
    ipex_available: bool  # an Intel GPU is usable through torch.xpu (IPEX itself is optional)
    intel_gpu_count: int = 0
    intel_gpu_memory: int = 0  # bytes, all Intel GPUs together (the seed read device 0 only)
    ipex_version: str | None = None  # installed intel-extension-for-pytorch, whether or not it matches torch
    reasons: dict[EngineType, EngineProblem] = Field(default_factory=dict)
    notes: dict[EngineType, str] = Field(default_factory=dict)  # caveats of available engines


class CpuInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    physical_cores: int
    logical_cores: int
    flags: list[str]  # the ones that matter for inference: avx2, avx512*, amx_*, neon
    ram_total_bytes: int
    ram_available_bytes: int


class GpuInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    vendor: str  # "intel", "nvidia", "apple"
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int | None = None
    driver: str | None = None  # driver version, or the kernel driver's name where that is all we can read
    integrated: bool | None = None  # shares the host's memory (Intel iGPU, Apple); None: not known
    level_zero_version: str | None = None  # Intel: the Level Zero loader's version, where readable
    nvlink: bool | None = None  # NVIDIA: an NVLink of this GPU is up (False: none, its peers over PCIe); None: not known


class IntelGpuInfo(BaseModel):
    """Intel GPUs as torch.xpu sees them, and as the PCI bus shows them (which needs no PyTorch support)."""

    model_config = ConfigDict(frozen=True)

    available: bool
    count: int = 0
    total_memory: int = 0  # bytes, all devices together
    device_name: str | None = None
    driver_version: str | None = None
    ipex_version: str | None = None
    pci_devices: list[str] = Field(default_factory=list)  # "0000:03:00.0 8086:56a0 (i915)"


class NodeHardware(BaseModel):
    model_config = ConfigDict(frozen=True)

    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # x86_64, arm64, ...
    cpu: CpuInfo
    gpus: list[GpuInfo] = Field(default_factory=list)
    apple_chip: str | None = None
