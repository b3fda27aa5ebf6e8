"""NodeInfos of machines that cannot exist here (an Intel GPU, an NVIDIA GPU), built from the shared types."""

from __future__ import annotations

from ringlet.shared.engine_info import CpuInfo, EngineInfo, EngineProblem, GpuInfo, NodeHardware
from ringlet.shared.instances import EngineType
from ringlet.shared.state import MemoryInfo, NodeInfo

GIB = 1024**3
_MISSING: dict[EngineType, EngineProblem] = {
    "ipex": EngineProblem(reason="no Intel GPU found", fix="install an Intel Arc or Data Center GPU"),
    "cuda": EngineProblem(reason="no NVIDIA GPU found", fix="install an NVIDIA GPU and driver"),
    "mlx": EngineProblem(reason="MLX needs macOS on Apple Silicon", fix="use a Mac"),
}


def node_info(node_id: str, free_gib: float, engines: tuple[EngineType, ...] = ("cpu",),
              gpus: tuple[GpuInfo, ...] = (), name: str | None = None) -> NodeInfo:
    free = int(free_gib * GIB)
    cpu = CpuInfo(model="Test CPU", physical_cores=4, logical_cores=8, flags=["avx2"], ram_total_bytes=free * 2,
                  ram_available_bytes=free)
    intel = [g for g in gpus if g.vendor == "intel"]
    info = EngineInfo(
        available_engines=list(engines), selected_engine=engines[0] if engines else None, mlx_available="mlx" in engines,
        torch_available=True, cpu_available="cpu" in engines, cuda_available="cuda" in engines,
        ipex_available="ipex" in engines, intel_gpu_count=len(intel),
        intel_gpu_memory=sum(g.memory_total_bytes for g in intel),
        reasons={e: p for e, p in _MISSING.items() if e not in engines},
    )
    hardware = NodeHardware(system="Linux", machine="x86_64", cpu=cpu, gpus=list(gpus))
    return NodeInfo(node_id=node_id, name=name or node_id, hardware=hardware, engines=info,
                    memory=MemoryInfo(total_bytes=free * 2, available_bytes=free), api_port=None)


def intel_gpu_node(node_id: str, free_gib: float, gpu_gib: float) -> NodeInfo:
    gpu = GpuInfo(vendor="intel", index=0, name="Intel(R) Arc(TM) A770", memory_total_bytes=int(gpu_gib * GIB))
    return node_info(node_id, free_gib, engines=("ipex", "cpu"), gpus=(gpu,))
