"""Placement: which nodes hold which layers of an instance. Pure functions over model cards and node infos.

Layers are split in proportion to each node's usable memory for the instance type's engine, over the nodes
whose engines suit the type. A mixed ring runs each stage on its own node's engine (the one the node was started
with, or the best it detected), so there each node counts with the memory of its engine. Without an explicit node
list the fewest nodes that fit are used (every extra stage costs a hop per token), the ones with the most memory
first.

Intel GPUs: an IpexRing stage may use the devices the instance allows on its node (its `intel_gpu_devices`, else
the node's discrete Intel GPUs, else its integrated ones), so a node counts with their free memory together. Its
stage runs on the one device with the most room where it fits there, else its layers are split over the fewest of
its devices that hold them (the largest first; in proportion to each device's own room; `Shard.devices`), else it
is refused naming each device and its memory. A mixed ring's Intel GPU stage runs on one device (the largest).

The context window: as asked (capped by the model's own), else the model's own capped by what the memory each stage's
weights leave holds for its KV cache (`fitting_context`); the instance records it and its engines hold that many
positions, so the memory counted is the memory they take.

Memory already promised: a node's reported free memory shows a runner's memory once it is loaded (the node refreshes
it), not while it loads; so the estimated memory of the instances still loading on a node is subtracted from what a
new one may use there, and that of ready ones is not (it would be counted twice).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ringlet.models.catalog import ModelCard, engine_weight_format
from ringlet.models.config import shard_misfit
from ringlet.models.kernels import CPU_KERNEL_FLAGS
from ringlet.shared.config import (
    DEFAULT_MAX_BATCH,
    KV_SHARE,
    MIN_CONTEXT,
    Precision,
    cache_positions,
    context_that_fits,
    sharded_precision,
)
from ringlet.shared.engine_info import GpuInfo
from ringlet.shared.instances import (
    MOST_TENSOR_PARALLEL,
    DeviceLayers,
    EngineType,
    Instance,
    InstanceType,
    IpexOptimizationLevel,
    Shard,
    rank_intel_gpus,
    single_node_type,
    tensor_parallel_misfit,
)
from ringlet.shared.state import InstanceCreated, InstanceRecord, NodeInfo, RunnerStatus

GIB = 1024**3
# The engine computes in this dtype, so its weights take this many bytes per parameter in memory (MLX: on Metal;
# on a CPU it computes in float32, see engine_dtype).
ENGINE_DTYPE: dict[EngineType, str] = {"cpu": "float32", "cuda": "bfloat16", "ipex": "bfloat16", "mlx": "bfloat16"}
ENGINE_NEEDS: dict[EngineType, str] = {
    "cpu": "the CPU engine (torch)",
    "cuda": "an NVIDIA GPU (CUDA)",
    "ipex": "an Intel GPU",
    "mlx": "Apple Silicon (MLX)",
}
MIXED_NEEDS = "an engine of its own (its --engine, or the best it detected)"
# Leave room for activations, the runtime and the rest of the machine.
USABLE_FRACTION = 0.9


class PlacementError(ValueError):
    """The instance cannot be placed; the message says why and what would make it fit."""


class DeviceChoiceError(PlacementError):
    """The instance's options do not suit it: a device its node lacks, or Intel options on another instance type."""


class InstanceOptions(BaseModel):
    """What an instance may be told beyond its model and type: its context window, its tensor-parallel degree, an
    IpexRing's devices and optimisation level."""

    model_config = ConfigDict(frozen=True)

    intel_gpu_devices: tuple[int, ...] | None = Field(
        None, min_length=1, description="IpexRing: the XPU device indexes of its node; None: its discrete Intel GPUs")
    ipex_optimization_level: IpexOptimizationLevel = "auto"
    max_context: int | None = Field(None, ge=MIN_CONTEXT, description="the context window (KV cache positions a "
                                    "sequence may use), capped by the model's own; None: the model's own, capped by "
                                    "what the nodes' memory holds")
    tensor_parallel: int = Field(1, ge=1, le=MOST_TENSOR_PARALLEL, description=(
        "split each stage over this many GPUs of its node (CudaRing, IpexRing; CpuRing: processes) by tensor "
        "parallelism"))

    @field_validator("intel_gpu_devices")
    @classmethod
    def _distinct(cls, devices: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if devices is not None and (min(devices) < 0 or len(set(devices)) != len(devices)):
            raise ValueError(f"intel_gpu_devices must be distinct device indexes (0, 1, ...), got {list(devices)}")
        return devices

    @classmethod
    def of(cls, instance: Instance) -> InstanceOptions:
        """The options an instance was placed with (to place it again alike)."""
        return cls(intel_gpu_devices=instance.intel_gpu_devices,
                   ipex_optimization_level=instance.ipex_optimization_level, max_context=instance.max_context,
                   tensor_parallel=instance.tensor_parallel)

    def misfit(self, instance_type: InstanceType) -> str | None:
        """Why these options do not apply to `instance_type`, or None."""
        if (misfit := tensor_parallel_misfit(instance_type, self.tensor_parallel)) is not None:
            return misfit
        if (instance_type == InstanceType.IPEX_RING
                or (self.intel_gpu_devices, self.ipex_optimization_level) == (None, "auto")):
            return None
        return (f"intel_gpu_devices and ipex_optimization_level apply to IpexRing instances only, not "
                f"{instance_type.value}; leave them out or pick IpexRing")


DEFAULT_OPTIONS = InstanceOptions()


class IntelDevice(BaseModel):
    """One Intel GPU of a node, as placement counts it."""

    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    integrated: bool | None
    free_bytes: int

    def describe(self) -> str:
        kind = {True: "integrated", False: "discrete", None: "kind unknown"}[self.integrated]
        return f"{self.index} ({self.name}, {kind}, {self.free_bytes / GIB:.1f} GiB free)"


class DevicePlan(BaseModel):
    """The layers of a stage on one Intel GPU of its node, where the stage is split over several."""

    model_config = ConfigDict(frozen=True)

    device: int
    start: int
    end: int
    memory_bytes: int = Field(description="estimated weights + KV cache of these layers")
    weight_bytes: int = Field(0, description="of memory_bytes, the weights")
    kv_bytes: int = Field(0, description="of memory_bytes, the KV cache")
    usable_bytes: int = Field(description="what the device can give them")


class StagePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    node_id: str
    node_name: str
    engine: EngineType
    start: int
    end: int
    memory_bytes: int = Field(description="estimated weights + KV cache of this stage")
    weight_bytes: int = Field(0, description="of memory_bytes, the weights as the engine holds them")
    kv_bytes: int = Field(0, description="of memory_bytes, the KV cache")
    weight_format: str = Field("", description="how the engine holds the weights: a dtype, or a quantised format "
                                               "(catalog.WEIGHT_FORMATS: int8, int4/128, int4/32)")
    usable_bytes: int = Field(description="memory the node can give the engine (an IpexRing stage: its allowed Intel "
                                          "GPUs together; a mixed ring's: its largest), less what its instances "
                                          "still loading will take")
    device: int | None = Field(None, description="an Intel GPU stage on one device: the device index counted with")
    tensor_parallel: int = Field(1, description="the GPUs (CpuRing: processes) the stage is split over by tensor "
                                                "parallelism; usable_bytes counts them together")
    link: str | None = Field(None, description="how a tensor-parallel stage's GPUs are linked: NVLink, PCIe, "
                                               "loopback (CPU processes), or unknown")
    devices: list[DevicePlan] = Field(default_factory=list, description="an Intel GPU stage split over devices")

    @property
    def fits(self) -> bool:
        if self.devices:
            return all(d.memory_bytes <= d.usable_bytes for d in self.devices)
        return self.memory_bytes <= self.usable_bytes


class Placement(BaseModel):
    model_config = ConfigDict(frozen=True)

    instance: Instance
    stages: list[StagePlan]


def created(placement: Placement, now: float) -> InstanceCreated:
    """The event that records a placed instance (its runners then start loading)."""
    return InstanceCreated(instance=placement.instance, created_at=now,
                           memory_bytes={s.node_id: s.memory_bytes for s in placement.stages})


class PlacementPreview(BaseModel):
    """One instance type's placement of a model, or why it is impossible."""

    model_config = ConfigDict(frozen=True)

    instance_type: InstanceType
    possible: bool
    reason: str | None = Field(None, description="why this instance type cannot serve the model now")
    context_length: int | None = Field(None, description="the context window it would hold (its KV cache is sized "
                                                         "for it)")
    stages: list[StagePlan] = Field(default_factory=list)


def usable_bytes(node: NodeInfo, engine: EngineType) -> int:
    return int(node.engine_memory_bytes(engine) * USABLE_FRACTION)


def intel_devices(node: NodeInfo) -> list[IntelDevice]:
    """The node's Intel GPUs; where only torch.xpu saw them (no PCI names), its count, sharing the total memory."""
    gpus = [g for g in node.hardware.gpus if g.vendor == "intel"]
    if gpus:
        return [IntelDevice(index=g.index, name=g.name, integrated=g.integrated,
                            free_bytes=g.memory_total_bytes if g.memory_free_bytes is None else g.memory_free_bytes)
                for g in gpus]
    count = node.engines.intel_gpu_count
    return [IntelDevice(index=i, name="Intel GPU", integrated=None, free_bytes=node.engines.intel_gpu_memory // count)
            for i in range(count)]


def allowed_devices(node: NodeInfo, wanted: tuple[int, ...] | None) -> list[IntelDevice]:
    """The devices an Intel GPU stage on `node` may run on: `wanted` (raises DeviceChoiceError naming the node's
    devices when it has not one of them), else the discrete ones, else (an iGPU-only node) the integrated ones."""
    devices = intel_devices(node)
    if wanted is not None:
        by_index = {d.index: d for d in devices}
        missing = [i for i in wanted if i not in by_index]
        if missing:
            raise DeviceChoiceError(f"node {node.name} has no Intel GPU {', '.join(map(str, missing))}; "
                                    f"its Intel GPUs: {_device_list(devices)}")
        return [by_index[i] for i in wanted]
    discrete = [d for d in devices if d.integrated is not True]
    return discrete or devices


def stage_bytes(card: ModelCard, start: int, end: int, engine: EngineType, kv_tokens: int,
                dtype: str | None = None) -> int:
    return sum(stage_parts(card, start, end, engine, kv_tokens, dtype))


def stage_parts(card: ModelCard, start: int, end: int, engine: EngineType, kv_tokens: int,
                dtype: str | None = None) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) of layers [start, end) on `engine`, its weights in `dtype` (a dtype or a weight
    format of the catalog; the engine's default by default)."""
    dtype = dtype or ENGINE_DTYPE[engine]
    return card.stage_bytes(start, end, dtype), card.kv_cache_bytes_per_token(dtype, end - start) * kv_tokens


def engine_dtype(node: NodeInfo, engine: EngineType, precision: Precision = "auto") -> str:
    """How `engine` holds a stage's weights on `node` at `precision`, by default the node's own (`--precision`)
    (catalog.engine_weight_format): MLX without Metal (not a Mac) in float32; the CPU engine quantises where the CPU
    computes in bf16 natively (a GGUF file's 5-bit groups kept where ringlet's CPU kernels run)."""
    flags = set(node.hardware.cpu.flags)
    return engine_weight_format(engine, node.precision if precision == "auto" else precision,
                                cpu_bf16=bool({"avx512_bf16", "amx_bf16"} & flags),
                                metal=node.hardware.apple_chip is not None,
                                cpu_kernels=set(CPU_KERNEL_FLAGS) <= flags)


def stage_engine(node: NodeInfo, instance_type: InstanceType) -> EngineType | None:
    """The engine `node` runs its stage on: the instance type's, or on a mixed ring the node's own."""
    return instance_type.engine or node.engines.selected_engine


def serves(card: ModelCard, instance_type: InstanceType) -> bool:
    # a mixed ring serves any card the torch engines run: torch stages read GGUF and safetensors, MLX stages read
    # Hugging Face directories through mlx-lm and GGUF through ringlet's reader; a model only mlx-lm has (its card
    # lists the MLX types alone) runs on MLX stages only
    mixed = instance_type == InstanceType.MIXED_RING and InstanceType.CPU_RING in card.instance_types
    return mixed or instance_type in card.instance_types


def served_by(card: ModelCard) -> list[InstanceType]:
    """The instance types that can serve `card`."""
    return [t for t in InstanceType if serves(card, t)]


def split_layers(num_layers: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous layer ranges in proportion to `weights` (largest remainder), at least one layer each."""
    if not weights or len(weights) > num_layers:
        raise PlacementError(f"cannot split {num_layers} layers over {len(weights)} nodes")
    spare = num_layers - len(weights)  # every node gets one layer; the rest goes by weight
    total = sum(weights) or 1.0
    exact = [spare * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (exact[i] - counts[i], weights[i]), reverse=True)
    for i in by_remainder[: spare - sum(counts)]:
        counts[i] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count + 1))
        start += count + 1
    return ranges


def place(
    card: ModelCard, instance_type: InstanceType, nodes: Sequence[NodeInfo], *, instance_id: str,
    node_ids: Sequence[str] | None = None, min_nodes: int = 1, kv_tokens: int | None = None,
    options: InstanceOptions = DEFAULT_OPTIONS, placed: Sequence[InstanceRecord] = (), precision: Precision = "auto",
) -> Placement:
    """Place `card` as an instance of `instance_type`, beside the instances `placed` already (those still loading
    hold their memory), its engines holding the weights at `precision` (`engine_dtype`); raises PlacementError with
    the reason when impossible (DeviceChoiceError: the options)."""
    if kv_tokens is None and options.max_context is not None:
        kv_tokens = min(card.context_length, options.max_context)
    if (misfit := options.misfit(instance_type)) is not None:
        raise DeviceChoiceError(misfit)
    if not serves(card, instance_type):
        types = ", ".join(t.value for t in served_by(card))
        only_mlx = "" if InstanceType.CPU_RING in card.instance_types else (
            f" (its architecture {card.architecture!r} is one of mlx-lm's that ringlet's torch engines do not build)")
        raise PlacementError(f"{card.id} ({card.format}) cannot run as {instance_type.value}{only_mlx}; it runs as: "
                             f"{types}")
    if min_nodes < 1:
        raise PlacementError(f"min_nodes must be at least 1, got {min_nodes}")
    degree = options.tensor_parallel
    if (misfit := shard_misfit(card.architecture, card.num_attention_heads, card.num_key_value_heads, degree)):
        raise PlacementError(f"{card.id}: {misfit}")
    candidates = _chosen_nodes(nodes, node_ids)
    suitable = [n for n in candidates if _suits(n, instance_type)]
    if not suitable:
        raise PlacementError(_no_suitable_node(instance_type, candidates))
    if instance_type in (InstanceType.CUDA_RING, InstanceType.IPEX_RING) and degree > 1:
        suitable = _with_gpus(suitable, instance_type, options, strict=node_ids is not None)
    needs = _needs(instance_type)
    if node_ids is not None and len(suitable) < len(candidates):
        unsuitable = [n for n in candidates if n not in suitable]
        raise PlacementError(f"{instance_type.value} needs {needs} on every node of the ring; "
                             + "; ".join(f"{n.name}: {_missing_reason(n, instance_type)}" for n in unsuitable))
    if len(suitable) < min_nodes:
        raise PlacementError(f"asked for at least {min_nodes} nodes but only {len(suitable)} of the "
                             f"{len(candidates)} nodes have {needs}")
    if min_nodes > card.num_layers:
        raise PlacementError(f"{card.id} has {card.num_layers} layers; it cannot be split over {min_nodes} nodes")
    if instance_type == InstanceType.IPEX_RING and options.intel_gpu_devices is not None and degree == 1:
        suitable = _with_devices(suitable, options.intel_gpu_devices, strict=node_ids is not None)

    rooms = {n.node_id: _room(n, instance_type, options, placed) for n in suitable}
    for node in suitable:  # a tensor-parallel stage's weights stay floats
        _tensor_parallel_dtype(node, instance_type, precision, degree)
    if node_ids is not None:
        ring_sizes = [len(suitable)]
    else:
        suitable.sort(key=lambda n: (-rooms[n.node_id].usable, n.node_id))
        ring_sizes = list(range(min_nodes, min(len(suitable), card.num_layers) + 1))

    def context(ring: Sequence[NodeInfo]) -> int:
        return kv_tokens if kv_tokens is not None else fitting_context(card, ring, instance_type, rooms, precision,
                                                                       degree)

    for size in ring_sizes:
        tokens = context(suitable[:size])
        stages = _plan(card, suitable[:size], instance_type, tokens, rooms, precision, degree)
        if all(s.fits for s in stages):
            positions = cache_plan(stages, tokens)
            stages = [with_cache(s, tokens, positions) for s in stages]
            shards = [Shard(node_id=s.node_id, rank=rank, start=s.start, end=s.end, num_layers=card.num_layers,
                            engine=s.engine, devices=tuple(DeviceLayers(device=d.device, start=d.start, end=d.end)
                                                           for d in s.devices))
                      for rank, s in enumerate(stages)]
            instance = Instance(instance_id=instance_id, model=card.id, instance_type=instance_type, shards=shards,
                                intel_gpu_devices=options.intel_gpu_devices,
                                ipex_optimization_level=options.ipex_optimization_level,
                                max_context=options.max_context, context_length=tokens,
                                kv_cache_tokens=positions, tensor_parallel=degree)
            return Placement(instance=instance, stages=stages)
    ring = suitable[: ring_sizes[-1]]
    tokens = context(ring)
    if instance_type.engine is None:
        raise PlacementError(_mixed_does_not_fit(card, tokens, _plan(card, ring, instance_type, tokens, rooms,
                                                                     precision, degree)))
    raise PlacementError(_does_not_fit(card, instance_type.engine, tokens, ring, rooms, options, precision))


def preview(
    card: ModelCard, nodes: Sequence[NodeInfo], *, node_ids: Sequence[str] | None = None, min_nodes: int = 1,
    kv_tokens: int | None = None, options: InstanceOptions = DEFAULT_OPTIONS, placed: Sequence[InstanceRecord] = (),
    precision: Precision = "auto",
) -> list[PlacementPreview]:
    """The placement each instance type would get, or why it cannot serve the model; the Intel options go to
    IpexRing's, the context window to each."""
    previews = []
    everyones = InstanceOptions(max_context=options.max_context, tensor_parallel=options.tensor_parallel)
    for instance_type in InstanceType:
        try:
            placement = place(card, instance_type, nodes, instance_id="preview", node_ids=node_ids,
                              min_nodes=min_nodes, kv_tokens=kv_tokens, placed=placed, precision=precision,
                              options=options if instance_type == InstanceType.IPEX_RING else everyones)
        except PlacementError as refusal:
            previews.append(PlacementPreview(instance_type=instance_type, possible=False, reason=str(refusal)))
        else:
            previews.append(PlacementPreview(instance_type=instance_type, possible=True, stages=placement.stages,
                                             context_length=placement.instance.context_length))
    return previews


def _chosen_nodes(nodes: Sequence[NodeInfo], node_ids: Sequence[str] | None) -> list[NodeInfo]:
    if not nodes:
        raise PlacementError("the cluster has no nodes")
    if node_ids is None:
        return list(nodes)
    if not node_ids:
        raise PlacementError("the node list is empty; leave it out to let placement choose")
    by_key = {n.node_id: n for n in nodes} | {n.name: n for n in nodes}
    unknown = [k for k in node_ids if k not in by_key]
    if unknown:
        known = ", ".join(f"{n.name} ({n.node_id})" for n in nodes)
        raise PlacementError(f"unknown node(s) {', '.join(unknown)}; known nodes: {known}")
    chosen = [by_key[k] for k in node_ids]
    if len({n.node_id for n in chosen}) != len(chosen):
        raise PlacementError("a node appears twice in the node list; each node runs one stage")
    return chosen


def _suits(node: NodeInfo, instance_type: InstanceType) -> bool:
    engine = stage_engine(node, instance_type)
    if instance_type == InstanceType.MLX_JACCL and node.hardware.system != "Darwin":
        return False  # jaccl is RDMA over Thunderbolt, which only macOS provides
    return engine is not None and node.engine_available(engine)


def _with_devices(nodes: list[NodeInfo], wanted: tuple[int, ...], strict: bool) -> list[NodeInfo]:
    """The nodes that have every device asked for; `strict` (the nodes were named): any without them is refused."""
    lacking: list[str] = []
    having = []
    for node in nodes:
        try:
            allowed_devices(node, wanted)
        except DeviceChoiceError as refusal:
            lacking.append(str(refusal))
        else:
            having.append(node)
    if lacking and (strict or not having):
        raise DeviceChoiceError("; ".join(lacking))
    return having


class _Room(BaseModel):
    model_config = ConfigDict(frozen=True)

    usable: int
    held: int  # of the node's usable memory, what its instances still loading will take
    device: int | None = None  # an Intel GPU stage: its largest device
    devices: list[_Room] = Field(default_factory=list)  # an IpexRing stage: each device it may be split over


def _nvidia_gpus(node: NodeInfo, degree: int) -> list[GpuInfo]:
    """The GPUs a CUDA stage of `degree` tensor-parallel ranks runs on: the node's first `degree` (rank r on GPU r)."""
    return sorted((g for g in node.hardware.gpus if g.vendor == "nvidia"), key=lambda g: g.index)[:degree]


def _rank_gpus(node: NodeInfo, instance_type: InstanceType, options: InstanceOptions) -> list[tuple[int, int]]:
    """(index, free bytes) of each GPU of `node` that a rank of a tensor-parallel stage runs on, of those it has."""
    degree = options.tensor_parallel
    if instance_type == InstanceType.IPEX_RING:
        devices = {d.index: d.free_bytes for d in intel_devices(node)}
        return [(i, devices[i]) for i in rank_intel_gpus(options.intel_gpu_devices, degree) if i in devices]
    return [(g.index, g.memory_total_bytes if g.memory_free_bytes is None else g.memory_free_bytes)
            for g in _nvidia_gpus(node, degree)]


def _with_gpus(nodes: list[NodeInfo], instance_type: InstanceType, options: InstanceOptions, strict: bool
               ) -> list[NodeInfo]:
    """The nodes with a GPU for each tensor-parallel rank; `strict` (the nodes were named): any lacking is refused."""
    degree = options.tensor_parallel
    if instance_type == InstanceType.IPEX_RING and options.intel_gpu_devices is not None and \
            len(options.intel_gpu_devices) < degree:
        raise DeviceChoiceError(f"tensor_parallel {degree} runs a rank on each of {degree} Intel GPUs, but "
                                f"intel_gpu_devices names {len(options.intel_gpu_devices)}; name {degree} or more")
    having = [n for n in nodes if len(_rank_gpus(n, instance_type, options)) == degree]
    lacking = [n for n in nodes if n not in having]
    if lacking and (strict or not having):
        if instance_type == InstanceType.IPEX_RING:
            which = ", ".join(map(str, rank_intel_gpus(options.intel_gpu_devices, degree)))
            kind, counts = f"Intel GPUs ({which})", "; ".join(
                f"{n.name}'s: {_device_list(intel_devices(n))}" for n in lacking)
        else:
            kind = "NVIDIA GPUs"
            counts = "; ".join(f"{n.name} has {len(_rank_gpus(n, instance_type, options))}" for n in lacking)
        raise PlacementError(f"tensor_parallel {degree} splits each stage over {degree} {kind} of its node: "
                             f"{counts}; lower tensor_parallel or add GPUs")
    return having


def _tensor_parallel_dtype(node: NodeInfo, instance_type: InstanceType, precision: Precision, degree: int
                           ) -> str | None:
    """How a tensor-parallel stage on `node` holds its weights: floats (bf16 on a GPU, fp32 on a CPU at auto), or
    PlacementError for a quantised precision, which tensor parallelism does not split; None without it."""
    engine = stage_engine(node, instance_type)
    if degree == 1 or engine is None:
        return None
    wanted = sharded_precision(node.precision if precision == "auto" else precision, engine)
    if wanted in ("int8", "int4"):
        raise PlacementError(f"tensor parallelism splits bf16, fp16 or fp32 weights, not {wanted} (the precision of "
                             f"node {node.name}); start it with --precision bf16, or leave tensor_parallel at 1")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[wanted]


def _link(node: NodeInfo, engine: EngineType, degree: int) -> str | None:
    """How a tensor-parallel stage's ranks reach each other: NVLink where every GPU reports one up, PCIe where one
    reports none; CPU ranks over loopback."""
    if degree == 1:
        return None
    if engine == "ipex":
        return "unknown"  # nothing ringlet reads tells Xe Link from PCIe
    if engine != "cuda":
        return "loopback"
    links = {g.nvlink for g in _nvidia_gpus(node, degree)}
    return "NVLink" if links == {True} else "PCIe" if False in links else "unknown"


def _room(node: NodeInfo, instance_type: InstanceType, options: InstanceOptions,
          placed: Sequence[InstanceRecord]) -> _Room:
    """What a new stage may take on `node`: the engine's usable memory (an IpexRing stage: its allowed devices'
    together; a mixed ring's Intel GPU stage: its largest device's) less what the instances still loading there
    will take."""
    engine = stage_engine(node, instance_type)
    assert engine is not None, "only suitable nodes are measured"
    held = _held(node, placed)
    if engine in ("cuda", "ipex") and options.tensor_parallel > 1:  # a rank a GPU: the least room of its GPUs
        gpus = _rank_gpus(node, instance_type, options)
        pools = {index: "cuda" if engine == "cuda" else f"xpu:{index}" for index, _ in gpus}
        least = min((int(free * USABLE_FRACTION) - (held[pools[index]] if engine == "ipex" else 0)
                     for index, free in gpus), default=0)
        taken = held["cuda"] if engine == "cuda" else 0
        return _Room(usable=max(0, least * len(gpus) - taken),
                     held=taken or sum(held[pool] for pool in pools.values()))
    if engine != "ipex":
        pool = _pool(engine)
        return _Room(usable=max(0, usable_bytes(node, engine) - held[pool]), held=held[pool])
    rooms = sorted((_Room(usable=max(0, int(d.free_bytes * USABLE_FRACTION) - held[f"xpu:{d.index}"]),
                          held=held[f"xpu:{d.index}"], device=d.index)
                    for d in allowed_devices(node, options.intel_gpu_devices)),
                   key=lambda r: (-r.usable, r.device))
    if not rooms:
        return _Room(usable=0, held=0)
    if instance_type != InstanceType.IPEX_RING:
        return rooms[0]
    return _Room(usable=sum(r.usable for r in rooms), held=_held_on_intel_gpus(node, placed), device=rooms[0].device,
                 devices=rooms)


def _pool(engine: EngineType) -> str:
    return "cuda" if engine == "cuda" else "ram"  # cpu and mlx (unified memory) take the host's memory


def _held(node: NodeInfo, placed: Sequence[InstanceRecord]) -> Counter[str]:
    """Memory the instances still loading on `node` will take, by pool ("ram", "cuda", "xpu:<index>"). A loading
    Intel GPU stage may land on any device it is allowed, so it holds its memory on each of them."""
    held: Counter[str] = Counter()
    for record in placed:
        runner = record.runners.get(node.node_id)
        if runner is None or runner.status != RunnerStatus.LOADING:
            continue  # a ready runner shows in the node's free memory already; a failed one holds nothing
        shard = record.instance.shard_of(node.node_id)
        memory = record.memory_bytes.get(node.node_id, 0)
        if shard.engine != "ipex":
            held[_pool(shard.engine)] += memory
            continue
        if shard.devices:  # split over devices: each holds its layers' share
            for part in shard.devices:
                held[f"xpu:{part.device}"] += memory * (part.end - part.start) // (shard.end - shard.start)
            continue
        try:
            devices = allowed_devices(node, record.instance.intel_gpu_devices)
        except DeviceChoiceError:
            devices = intel_devices(node)  # placed when the node reported other devices: count it everywhere
        for device in devices:
            held[f"xpu:{device.index}"] += memory
    return held


def _held_on_intel_gpus(node: NodeInfo, placed: Sequence[InstanceRecord]) -> int:
    """The memory the Intel GPU stages still loading on `node` will take, each counted once."""
    return sum(record.memory_bytes.get(node.node_id, 0) for record in placed
               if (runner := record.runners.get(node.node_id)) is not None and runner.status == RunnerStatus.LOADING
               and record.instance.shard_of(node.node_id).engine == "ipex")


def _device_list(devices: Sequence[IntelDevice]) -> str:
    return ", ".join(d.describe() for d in devices) or "none"


def _needs(instance_type: InstanceType) -> str:
    return MIXED_NEEDS if instance_type.engine is None else ENGINE_NEEDS[instance_type.engine]


def _missing_reason(node: NodeInfo, instance_type: InstanceType) -> str:
    if instance_type == InstanceType.MLX_JACCL and node.hardware.system != "Darwin":
        return f"MLX Jaccl needs macOS (RDMA over Thunderbolt); it runs {node.hardware.system}"
    if instance_type.engine is not None:
        return node.engine_missing_reason(instance_type.engine)
    problems = "; ".join(f"{e}: {p.reason}" for e, p in node.engines.reasons.items())
    return f"no engine is available ({problems or 'none detected'})"


def _plan(card: ModelCard, ring: Sequence[NodeInfo], instance_type: InstanceType, kv_tokens: int,
          rooms: dict[str, _Room], precision: Precision = "auto", degree: int = 1) -> list[StagePlan]:
    ranges = split_layers(card.num_layers, [float(max(rooms[n.node_id].usable, 1)) for n in ring])
    stages = []
    for node, (start, end) in zip(ring, ranges):
        engine = stage_engine(node, instance_type)
        assert engine is not None
        room = rooms[node.node_id]
        dtype = _tensor_parallel_dtype(node, instance_type, precision, degree) or engine_dtype(node, engine, precision)
        weights, kv = stage_parts(card, start, end, engine, kv_tokens, dtype)
        devices = _over_devices(card, start, end, kv_tokens, dtype, room) if room.devices else []
        stages.append(StagePlan(node_id=node.node_id, node_name=node.name, engine=engine, start=start, end=end,
                                usable_bytes=room.usable, memory_bytes=weights + kv, weight_bytes=weights,
                                kv_bytes=kv, weight_format=dtype, devices=devices,
                                device=None if devices else room.device, tensor_parallel=degree,
                                link=_link(node, engine, degree)))
    return stages


def _torch_device(engine: EngineType) -> str:
    return "xpu" if engine == "ipex" else "cuda" if engine == "cuda" else "cpu"


def cache_plan(stages: Sequence[StagePlan], context: int, max_batch: int = DEFAULT_MAX_BATCH) -> int | None:
    """The KV cache positions every torch stage of a ring will hold for a context window of `context` positions
    (their engines agree on the smallest, `pipeline._agreed`): `cache_positions` over the room each stage's (or each
    of its Intel GPUs') weights leave, for a node's default batch; None where no stage is a torch engine's (MLX
    grows its caches as sequences come)."""
    counts = []
    for stage in stages:
        if stage.engine == "mlx" or context <= 0:
            continue
        parts = ([(d.usable_bytes, d.weight_bytes, d.kv_bytes) for d in stage.devices]
                 or [(stage.usable_bytes, stage.weight_bytes, stage.kv_bytes)])
        counts += [cache_positions(context, _torch_device(stage.engine), max_batch, usable - weights, kv // context)
                   for usable, weights, kv in parts]
    return min(counts) if counts else None


def with_cache(stage: StagePlan, context: int, positions: int | None) -> StagePlan:
    """`stage` counting a KV cache of `positions` positions where it counted one context (`cache_plan`)."""
    if positions is None or stage.engine == "mlx" or context <= 0:
        return stage
    devices = [d.model_copy(update={"kv_bytes": d.kv_bytes // context * positions,
                                    "memory_bytes": d.weight_bytes + d.kv_bytes // context * positions})
               for d in stage.devices]
    kv = sum(d.kv_bytes for d in devices) if devices else stage.kv_bytes // context * positions
    return stage.model_copy(update={"kv_bytes": kv, "memory_bytes": stage.weight_bytes + kv, "devices": devices})


def fitting_context(card: ModelCard, ring: Sequence[NodeInfo], instance_type: InstanceType, rooms: dict[str, _Room],
                    precision: Precision = "auto", degree: int = 1) -> int:
    """The context window of an instance placed on `ring` without one: the model's own, capped by the KV cache
    positions that each stage's share (`KV_SHARE`, as its engine sizes its cache) of the room its weights leave holds
    (`context_that_fits`)."""
    contexts = []
    for stage in _plan(card, ring, instance_type, 0, rooms, precision, degree):
        per_token = stage_parts(card, stage.start, stage.end, stage.engine, 1, stage.weight_format)[1]
        # MLX's memory is the host's, shared with the rest of the machine as the CPU engine's is
        share = KV_SHARE[_torch_device(stage.engine)]
        contexts.append(context_that_fits(card.context_length, stage.usable_bytes - stage.weight_bytes, per_token,
                                          share))
    return min(contexts)


def _over_devices(card: ModelCard, start: int, end: int, kv_tokens: int, dtype: str, room: _Room) -> list[DevicePlan]:
    """Layers [start, end) over the fewest of `room`'s devices (the largest first) that hold them, in proportion to
    each one's room, in device order; [] where the largest holds them alone; the split over every device (which does
    not fit) where none does."""
    if stage_bytes(card, start, end, "ipex", kv_tokens, dtype) <= room.devices[0].usable:
        return []
    plan: list[DevicePlan] = []
    for count in range(2, min(len(room.devices), end - start) + 1):
        chosen = sorted(room.devices[:count], key=lambda r: r.device or 0)
        parts = split_layers(end - start, [float(max(r.usable, 1)) for r in chosen])
        plan = [_device_plan(card, r, start + a, start + b, kv_tokens, dtype)
                for r, (a, b) in zip(chosen, parts, strict=True)]
        if all(d.memory_bytes <= d.usable_bytes for d in plan):
            return plan
    return plan


def _device_plan(card: ModelCard, room: _Room, start: int, end: int, kv_tokens: int, dtype: str) -> DevicePlan:
    weights, kv = stage_parts(card, start, end, "ipex", kv_tokens, dtype)
    return DevicePlan(device=room.device or 0, start=start, end=end, usable_bytes=room.usable,
                      memory_bytes=weights + kv, weight_bytes=weights, kv_bytes=kv)


def _no_suitable_node(instance_type: InstanceType, candidates: Sequence[NodeInfo]) -> str:
    count = len(candidates)
    reasons = "; ".join(f"{n.name}: {_missing_reason(n, instance_type)}" for n in candidates)
    return (f"{instance_type.value} needs a node with {_needs(instance_type)}; none of the {count} "
            f"node{'s' if count != 1 else ''} has one ({reasons})")


def _does_not_fit(card: ModelCard, engine: EngineType, kv_tokens: int, ring: Sequence[NodeInfo],
                  rooms: dict[str, _Room], options: InstanceOptions, precision: Precision) -> str:
    dtype = (_tensor_parallel_dtype(ring[0], single_node_type(engine), precision, options.tensor_parallel)
             or engine_dtype(ring[0], engine, precision)
             if ring else ENGINE_DTYPE[engine])
    needed = stage_bytes(card, 0, card.num_layers, engine, kv_tokens, dtype)
    have = sum(rooms[n.node_id].usable for n in ring)
    held = sum(rooms[n.node_id].held for n in ring)
    plural = len(ring) != 1
    waiting = (f" (after {held / GIB:.1f} GiB held for {'their' if plural else 'its'} still loading instances: "
               "try again once they are loaded)" if held else "")
    if engine == "ipex":
        devices = "; ".join(f"{n.name}: {_device_list(allowed_devices(n, options.intel_gpu_devices))}" for n in ring)
        return (f"{card.id} needs {needed / GIB:.1f} GiB on Intel GPUs ({dtype} weights and a {kv_tokens}-token KV "
                f"cache), split over the devices it may use, which have {have / GIB:.1f} GiB usable together"
                f"{waiting} ({devices}): add a node, allow more devices (intel_gpu_devices) or pick a smaller model")
    return (f"{card.id} needs {needed / GIB:.1f} GiB on {engine} ({dtype} weights and a "
            f"{kv_tokens}-token KV cache); the {len(ring)} suitable node{'s' if plural else ''} "
            f"{'have' if plural else 'has'} {have / GIB:.1f} GiB usable{waiting}: add a node or pick a smaller model")


def _mixed_does_not_fit(card: ModelCard, kv_tokens: int, stages: Sequence[StagePlan]) -> str:
    short = [s for s in stages if s.memory_bytes > s.usable_bytes]
    detail = "; ".join(f"{s.node_name} ({s.engine}, layers {s.start}-{s.end - 1}) needs {s.memory_bytes / GIB:.1f} "
                       f"GiB, has {s.usable_bytes / GIB:.1f}" for s in short)
    return (f"{card.id} does not fit a mixed ring of the {len(stages)} suitable node{'s' if len(stages) != 1 else ''}"
            f" with a {kv_tokens}-token KV cache: {detail}; add a node or pick a smaller model")
