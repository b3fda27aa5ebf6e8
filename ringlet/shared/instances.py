"""Instances: a model placed on an ordered ring of nodes, each node running one stage (a shard)."""

from __future__ import annotations

import itertools
from enum import Enum
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EngineType = Literal["mlx", "ipex", "cuda", "cpu"]
GPU_ENGINES: tuple[EngineType, ...] = ("cuda", "ipex", "mlx")  # those that hold a stage in a GPU's memory
ENGINE_TYPES: frozenset[str] = frozenset(get_args(EngineType))
# how the Intel engine optimises a model: IPEX where usable else torch.compile (auto), or exactly one of them
IpexOptimizationLevel = Literal["auto", "ipex", "compile", "eager"]


class InstanceType(str, Enum):
    MLX_RING = "MlxRing"
    MLX_JACCL = "MlxJaccl"
    CPU_RING = "CpuRing"
    CUDA_RING = "CudaRing"
    IPEX_RING = "IpexRing"
    MIXED_RING = "MixedRing"  # each stage on its node's own engine, hidden states as host tensors over gloo

    @classmethod
    def parse(cls, name: str) -> InstanceType:
        """Accepts the old name MlxIbv for MlxJaccl; an unknown name lists the known ones."""
        if name == "MlxIbv":
            return cls.MLX_JACCL
        try:
            return cls(name)
        except ValueError:
            known = ", ".join([t.value for t in cls] + ["MlxIbv"])
            raise ValueError(f"unknown instance type {name!r}; known: {known}") from None

    @property
    def engine(self) -> EngineType | None:
        """The engine every stage runs; None for a mixed ring, whose stages run their own node's engine."""
        return INSTANCE_ENGINE.get(self)


# Decided once per instance, never re-detected per call (DESIGN.md, Engines). A mixed ring's engines are
# decided per stage at placement (Shard.engine).
INSTANCE_ENGINE: dict[InstanceType, EngineType] = {
    InstanceType.MLX_RING: "mlx",
    InstanceType.MLX_JACCL: "mlx",
    InstanceType.CPU_RING: "cpu",
    InstanceType.CUDA_RING: "cuda",
    InstanceType.IPEX_RING: "ipex",
}


# the instance types whose stages may be split by tensor parallelism: CUDA over NCCL, Intel GPUs over xccl, CPU
# processes over gloo
TENSOR_PARALLEL_TYPES = (InstanceType.CUDA_RING, InstanceType.IPEX_RING, InstanceType.CPU_RING)
MOST_TENSOR_PARALLEL = 64


def tensor_parallel_misfit(instance_type: InstanceType, degree: int) -> str | None:
    """Why `instance_type` cannot split its stages over `degree` tensor-parallel ranks, or None."""
    if degree == 1 or instance_type in TENSOR_PARALLEL_TYPES:
        return None
    types = ", ".join(t.value for t in TENSOR_PARALLEL_TYPES)
    return f"tensor_parallel applies to {types} instances, not {instance_type.value}; leave it at 1 or pick CudaRing"


def rank_intel_gpus(wanted: tuple[int, ...] | None, degree: int) -> tuple[int, ...]:
    """The Intel GPUs an IpexRing stage of `degree` tensor-parallel ranks runs on, rank r on the r-th: the first
    `degree` of the instance's `intel_gpu_devices`, else devices 0 ... degree - 1 (placement counts the memory of
    these, the ranks open them)."""
    return tuple(wanted[:degree]) if wanted is not None else tuple(range(degree))


def single_node_type(engine: EngineType) -> InstanceType:
    """The instance type that runs a single-node instance on `engine`."""
    return {"cpu": InstanceType.CPU_RING, "cuda": InstanceType.CUDA_RING, "ipex": InstanceType.IPEX_RING,
            "mlx": InstanceType.MLX_RING}[engine]


class DeviceLayers(BaseModel):
    """Layers [start, end) of a shard on one Intel GPU of its node."""

    model_config = ConfigDict(frozen=True)

    device: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(gt=0)


class Shard(BaseModel):
    """Layers [start, end) of a model on one node; rank is the node's place in the ring. An IpexRing shard too
    large for any one Intel GPU of its node is split over several (`devices`, in order); empty: one GPU, which the
    runner picks."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    rank: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    engine: EngineType = "cpu"  # a mixed ring may run a different engine per stage
    devices: tuple[DeviceLayers, ...] = ()

    @model_validator(mode="after")
    def _devices_cover_the_shard(self) -> Shard:
        if not self.devices:
            return self
        if self.engine != "ipex":
            raise ValueError(f"only an ipex shard is split over devices, not a {self.engine} one")
        if len({d.device for d in self.devices}) != len(self.devices):
            raise ValueError("a shard's devices must be distinct")
        bounds = [self.start] + [d.end for d in self.devices]
        if [d.start for d in self.devices] != bounds[:-1] or bounds[-1] != self.end or \
                any(d.start >= d.end for d in self.devices):
            raise ValueError(f"the devices' layers must split the shard's layers {self.start}-{self.end - 1} "
                             "in order, at least one each")
        return self

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers


class Instance(BaseModel):
    model_config = ConfigDict(frozen=True)

    instance_id: str
    model: str
    instance_type: InstanceType
    shards: list[Shard] = Field(min_length=1)
    intel_gpu_devices: tuple[int, ...] | None = Field(
        None, description="IpexRing: the XPU device indexes of its node it runs on; None: the discrete ones")
    ipex_optimization_level: IpexOptimizationLevel = Field(
        "auto", description="IpexRing: IPEX where usable, else torch.compile (auto), or only ipex/compile/eager")
    max_context: int | None = Field(None, ge=16, description="the context window asked for (capped by the model's "
                                                             "own); None: placement chooses it")
    tensor_parallel: int = Field(1, ge=1, le=MOST_TENSOR_PARALLEL, description=(
        "ranks each stage is split over by tensor parallelism: a CudaRing or IpexRing stage over that many GPUs of "
        "its node, a CpuRing's over that many processes; 1: none"))
    context_length: int | None = Field(None, ge=16, description="the context window its engines hold: max_context "
                                                                "capped by the model's own, else the model's own "
                                                                "capped by what its nodes' memory holds (placement "
                                                                "sizes its KV cache for it); None: the node's")
    kv_cache_tokens: int | None = Field(None, ge=16, description="positions of each stage's KV cache that placement "
                                                                 "counted (as many sequences of context_length as "
                                                                 "the engines take, in their share of the memory "
                                                                 "left); its engines hold no more; None: the node's")

    @field_validator("instance_type", mode="before")
    @classmethod
    def _parse_type(cls, v: object) -> object:
        return InstanceType.parse(v) if isinstance(v, str) else v

    @field_validator("shards")
    @classmethod
    def _contiguous(cls, shards: list[Shard]) -> list[Shard]:
        ordered = sorted(shards, key=lambda s: s.rank)
        if [s.rank for s in ordered] != list(range(len(ordered))):
            raise ValueError("shard ranks must be 0..n-1")
        if ordered[0].start != 0 or ordered[-1].end != ordered[-1].num_layers:
            raise ValueError("shards must cover every layer")
        if any(a.end != b.start for a, b in itertools.pairwise(ordered)):
            raise ValueError("shards must be contiguous")
        return ordered

    @model_validator(mode="after")
    def _tensor_parallel_fits(self) -> Instance:
        if (misfit := tensor_parallel_misfit(self.instance_type, self.tensor_parallel)) is not None:
            raise ValueError(misfit)
        return self

    def shard_of(self, node_id: str) -> Shard:
        for s in self.shards:
            if s.node_id == node_id:
                return s
        raise KeyError(f"node {node_id} holds no shard of instance {self.instance_id}")


class BoundInstance(BaseModel):
    """An instance seen from one node: which shard this node runs."""

    model_config = ConfigDict(frozen=True)

    instance: Instance
    node_id: str

    @property
    def shard(self) -> Shard:
        return self.instance.shard_of(self.node_id)

    @property
    def engine(self) -> EngineType:
        return self.shard.engine
