"""Placement: which nodes hold which layers of an instance. Pure functions over model cards and node infos.

Layers are split in proportion to each node's usable memory for the instance type's engine, over the nodes
whose engines suit the type. A mixed ring runs each stage on its own node's engine (the one the node was started
with, or the best it detected), so there each node counts with the memory of its engine. Without an explicit node
list the fewest nodes that fit are used (every extra stage costs a hop per token), the ones with the most memory
first.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from ringlet.models.catalog import WEIGHT_ONLY_INT8, ModelCard
from ringlet.shared.config import DEFAULT_MAX_CONTEXT
from ringlet.shared.instances import EngineType, Instance, InstanceType, Shard
from ringlet.shared.state import InstanceCreated, NodeInfo

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
# The engines size their KV cache for min(model context, EngineConfig.max_context) tokens.
DEFAULT_KV_TOKENS = DEFAULT_MAX_CONTEXT
# Leave room for activations, the runtime and the rest of the machine.
USABLE_FRACTION = 0.9


class PlacementError(ValueError):
    """The instance cannot be placed; the message says why and what would make it fit."""


class StagePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    node_id: str
    node_name: str
    engine: EngineType
    start: int
    end: int
    memory_bytes: int = Field(description="estimated weights + KV cache of this stage")
    usable_bytes: int = Field(description="memory the node can give the engine")


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
    stages: list[StagePlan] = Field(default_factory=list)


def usable_bytes(node: NodeInfo, engine: EngineType) -> int:
    return int(node.engine_memory_bytes(engine) * USABLE_FRACTION)


def stage_bytes(card: ModelCard, start: int, end: int, engine: EngineType, kv_tokens: int,
                dtype: str | None = None) -> int:
    dtype = dtype or ENGINE_DTYPE[engine]
    return card.stage_bytes(start, end, dtype) + card.kv_cache_bytes_per_token(dtype, end - start) * kv_tokens


def engine_dtype(node: NodeInfo, engine: EngineType) -> str:
    """The dtype of `engine`'s weights on `node`: MLX without Metal (not a Mac) runs float32; the CPU engine
    quantises its weights (int8, or int4 from a file's 4-bit blocks) where the CPU computes in bf16 natively."""
    if engine == "mlx" and node.hardware.apple_chip is None:
        return "float32"
    if engine == "cpu" and {"avx512_bf16", "amx_bf16"} & set(node.hardware.cpu.flags):
        return WEIGHT_ONLY_INT8
    return ENGINE_DTYPE[engine]


def stage_engine(node: NodeInfo, instance_type: InstanceType) -> EngineType | None:
    """The engine `node` runs its stage on: the instance type's, or on a mixed ring the node's own."""
    return instance_type.engine or node.engines.selected_engine


def serves(card: ModelCard, instance_type: InstanceType) -> bool:
    # a mixed ring serves any card: torch stages read GGUF and safetensors, MLX stages read Hugging Face
    # directories through mlx-lm and GGUF through ringlet's reader
    return instance_type == InstanceType.MIXED_RING or instance_type in card.instance_types


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
) -> Placement:
    """Place `card` as an instance of `instance_type`; raises PlacementError with the reason when impossible."""
    tokens = min(card.context_length, DEFAULT_KV_TOKENS) if kv_tokens is None else kv_tokens
    if not serves(card, instance_type):
        served_by = ", ".join(dict.fromkeys(t.value for t in [*card.instance_types, InstanceType.MIXED_RING]))
        raise PlacementError(f"{card.id} ({card.format}) cannot run as {instance_type.value}; it runs as: {served_by}")
    if min_nodes < 1:
        raise PlacementError(f"min_nodes must be at least 1, got {min_nodes}")
    candidates = _chosen_nodes(nodes, node_ids)
    suitable = [n for n in candidates if _suits(n, instance_type)]
    if not suitable:
        raise PlacementError(_no_suitable_node(instance_type, candidates))
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

    if node_ids is not None:
        ring_sizes = [len(suitable)]
    else:
        suitable.sort(key=lambda n: (-_usable(n, instance_type), n.node_id))
        ring_sizes = list(range(min_nodes, min(len(suitable), card.num_layers) + 1))
    for size in ring_sizes:
        stages = _plan(card, suitable[:size], instance_type, tokens)
        if all(s.memory_bytes <= s.usable_bytes for s in stages):
            shards = [Shard(node_id=s.node_id, rank=rank, start=s.start, end=s.end, num_layers=card.num_layers,
                            engine=s.engine) for rank, s in enumerate(stages)]
            instance = Instance(instance_id=instance_id, model=card.id, instance_type=instance_type, shards=shards)
            return Placement(instance=instance, stages=stages)
    ring = suitable[: ring_sizes[-1]]
    if instance_type.engine is None:
        raise PlacementError(_mixed_does_not_fit(card, tokens, _plan(card, ring, instance_type, tokens)))
    raise PlacementError(_does_not_fit(card, instance_type.engine, tokens, ring))


def preview(
    card: ModelCard, nodes: Sequence[NodeInfo], *, node_ids: Sequence[str] | None = None, min_nodes: int = 1,
    kv_tokens: int | None = None,
) -> list[PlacementPreview]:
    """The placement each instance type would get, or why it cannot serve the model."""
    previews = []
    for instance_type in InstanceType:
        try:
            placement = place(card, instance_type, nodes, instance_id="preview", node_ids=node_ids,
                              min_nodes=min_nodes, kv_tokens=kv_tokens)
        except PlacementError as refusal:
            previews.append(PlacementPreview(instance_type=instance_type, possible=False, reason=str(refusal)))
        else:
            previews.append(PlacementPreview(instance_type=instance_type, possible=True, stages=placement.stages))
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


def _usable(node: NodeInfo, instance_type: InstanceType) -> int:
    engine = stage_engine(node, instance_type)
    assert engine is not None, "only suitable nodes are measured"
    return usable_bytes(node, engine)


def _needs(instance_type: InstanceType) -> str:
    return MIXED_NEEDS if instance_type.engine is None else ENGINE_NEEDS[instance_type.engine]


def _missing_reason(node: NodeInfo, instance_type: InstanceType) -> str:
    if instance_type == InstanceType.MLX_JACCL and node.hardware.system != "Darwin":
        return f"MLX Jaccl needs macOS (RDMA over Thunderbolt); it runs {node.hardware.system}"
    if instance_type.engine is not None:
        return node.engine_missing_reason(instance_type.engine)
    problems = "; ".join(f"{e}: {p.reason}" for e, p in node.engines.reasons.items())
    return f"no engine is available ({problems or 'none detected'})"


def _plan(card: ModelCard, ring: Sequence[NodeInfo], instance_type: InstanceType, kv_tokens: int) -> list[StagePlan]:
    usable = [_usable(n, instance_type) for n in ring]
    ranges = split_layers(card.num_layers, [float(max(u, 1)) for u in usable])
    stages = []
    for node, u, (start, end) in zip(ring, usable, ranges):
        engine = stage_engine(node, instance_type)
        assert engine is not None
        memory = stage_bytes(card, start, end, engine, kv_tokens, engine_dtype(node, engine))
        stages.append(StagePlan(node_id=node.node_id, node_name=node.name, engine=engine, start=start, end=end,
                                usable_bytes=u, memory_bytes=memory))
    return stages


def _no_suitable_node(instance_type: InstanceType, candidates: Sequence[NodeInfo]) -> str:
    count = len(candidates)
    reasons = "; ".join(f"{n.name}: {_missing_reason(n, instance_type)}" for n in candidates)
    return (f"{instance_type.value} needs a node with {_needs(instance_type)}; none of the {count} "
            f"node{'s' if count != 1 else ''} has one ({reasons})")


def _does_not_fit(card: ModelCard, engine: EngineType, kv_tokens: int, ring: Sequence[NodeInfo]) -> str:
    dtype = engine_dtype(ring[0], engine) if ring else ENGINE_DTYPE[engine]
    needed = stage_bytes(card, 0, card.num_layers, engine, kv_tokens, dtype)
    have = sum(usable_bytes(n, engine) for n in ring)
    return (f"{card.id} needs {needed / GIB:.1f} GiB on {engine} ({dtype} weights and a "
            f"{kv_tokens}-token KV cache); the {len(ring)} suitable node{'s' if len(ring) != 1 else ''} "
            f"{'have' if len(ring) != 1 else 'has'} {have / GIB:.1f} GiB usable: add a node or pick a smaller model")


def _mixed_does_not_fit(card: ModelCard, kv_tokens: int, stages: Sequence[StagePlan]) -> str:
    short = [s for s in stages if s.memory_bytes > s.usable_bytes]
    detail = "; ".join(f"{s.node_name} ({s.engine}, layers {s.start}-{s.end - 1}) needs {s.memory_bytes / GIB:.1f} "
                       f"GiB, has {s.usable_bytes / GIB:.1f}" for s in short)
    return (f"{card.id} does not fit a mixed ring of the {len(stages)} suitable node{'s' if len(stages) != 1 else ''}"
            f" with a {kv_tokens}-token KV cache: {detail}; add a node or pick a smaller model")
