"""The engine settings of a node: read once from the environment (or the CLI's flags) where a process starts, then
carried to every runner inside its load message. Nothing below the runner reads the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# the precision of weights (int8/int4: weight-only, with bf16 activations where the CPU has native bf16)
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def sharded_precision(precision: Precision, engine: str) -> Precision:
    """What a tensor-parallel rank holds its weights in: floats, so auto is bf16 on a GPU and fp32 on a CPU (`engine`
    or a torch device type); an explicit precision stays (int8/int4 are refused where the stage loads)."""
    if precision != "auto":
        return precision
    return "fp32" if engine == "cpu" else "bf16"
# which decode step a CUDA graph replays: fused Triton kernels where the model allows, or the model's own forward
# through torch.compile (every architecture)
CudaDecode = Literal["fused", "compiled"]
# how hard inductor tunes a compiled CUDA decode step: its heuristics; + coordinate-descent tuning of each kernel's
# launch parameters; + a benchmarked choice between cuBLAS and Triton templates for every matmul
CudaCompile = Literal["default", "tuned", "max-autotune"]

DEFAULT_MAX_CONTEXT = 8192  # of an engine loaded without an instance (`ringlet run`, benchmarks)
MIN_CONTEXT = 16  # the smallest context window an instance is placed with (InstanceOptions.max_context)
# of the memory left after the weights, the share a KV cache takes, by torch device type: the host's RAM is shared
# with everything else on the machine, an accelerator's is not
KV_SHARE = {"cpu": 0.25, "cuda": 0.8, "xpu": 0.8}
# an instance given no context window is not given one shorter than this (or than the model's own): where not even
# that fits, placement refuses it saying what it needs
LEAST_CHOSEN_CONTEXT = 2048
# a CPU's cache holds this many sequences at the longest context (many more short ones): a CPU computes a few
# sequences at a time usefully, and the cache is committed at load, so a larger one only takes memory from the machine
CPU_CONTEXTS = 8
DEFAULT_MAX_BATCH = 64  # sequences generating at once in an instance (EngineConfig.max_batch)


def cache_positions(context: int, device_type: str, max_batch: int, room_bytes: int, bytes_per_token: int) -> int:
    """Positions of a stage's KV cache on a torch device of `device_type` (cpu, cuda, xpu): what `max_batch`
    sequences of `context` positions use (on a CPU, CPU_CONTEXTS of them at most), capped by the device's share
    (KV_SHARE) of `room_bytes`, the memory the stage's weights leave, and at least one such sequence. An engine sizes
    its cache so over the memory it finds free, and placement over the room it counted, as the bytes it will hold."""
    fits = int(max(room_bytes, 0) * KV_SHARE.get(device_type, KV_SHARE["cpu"])) // max(bytes_per_token, 1)
    sequences = min(max_batch, CPU_CONTEXTS) if device_type == "cpu" else max_batch
    return max(context, min(fits, sequences * context))


def context_that_fits(model_context: int, free_bytes: int, kv_bytes_per_token: int, share: float) -> int:
    """The context window of an instance given none: the model's own, capped by the positions whose KV cache fits in
    `share` of `free_bytes` (the memory the weights leave) in whole 1024s, and at least LEAST_CHOSEN_CONTEXT."""
    fits = int(max(free_bytes, 0) * share) // max(kv_bytes_per_token, 1) // 1024 * 1024
    return min(model_context, max(fits, LEAST_CHOSEN_CONTEXT))

PRECISION_ENV = "RINGLET_PRECISION"
CPU_COMPILE_ENV = "RINGLET_CPU_COMPILE"
CUDA_DECODE_ENV = "RINGLET_CUDA_DECODE"
CUDA_COMPILE_ENV = "RINGLET_CUDA_COMPILE"
MAX_BATCH_ENV = "RINGLET_MAX_BATCH"
MAX_QUEUED_ENV = "RINGLET_MAX_QUEUED"
MAX_STEP_TOKENS_ENV = "RINGLET_MAX_STEP_TOKENS"
BURST_PAUSE_ENV = "RINGLET_BURST_PAUSE_MS"
RUNNER_STALL_ENV = "RINGLET_RUNNER_STALL_S"
RUNNER_RESTARTS_ENV = "RINGLET_RUNNER_RESTARTS"
STREAM_IDLE_ENV = "RINGLET_STREAM_IDLE_S"
REPLACE_GRACE_ENV = "RINGLET_REPLACE_GRACE_S"
MAX_INSTANCES_ENV = "RINGLET_MAX_INSTANCES"
KV_CACHE_TOKENS_ENV = "RINGLET_KV_CACHE_TOKENS"


class EngineConfig(BaseModel):
    """How every engine and stage of a node loads and runs its model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Precision = "auto"
    max_context: int = Field(DEFAULT_MAX_CONTEXT, ge=16, description="positions of the KV cache (capped by the model)")
    cpu_compile: bool = Field(True, description="compile the CPU decode step at warm-up (False: decode eagerly)")
    cuda_decode: CudaDecode = "fused"
    cuda_compile: CudaCompile = "tuned"
    max_batch: int = Field(DEFAULT_MAX_BATCH, ge=1, le=1024, description="sequences generating at once in an "
                                                                         "instance")
    max_step_tokens: int = Field(512, ge=16, description="tokens one batched step computes: decodes and prompt chunks")
    burst_pause_ms: int = Field(250, ge=0, description="milliseconds a generating stream may pause while a burst of "
                                                       "new prompts is filled first (0: every step decodes every "
                                                       "stream)")
    max_queued: int = Field(256, ge=0, description="requests waiting for a place in the batch; more get 429")
    max_instances: int = Field(8, ge=1, description="instances with a stage on one node (each a runner process); "
                                                    "more are refused with 409")
    runner_stall_s: int = Field(30, ge=1, description="seconds a runner with requests may send nothing (no token, no "
                                                     "progress) before it is killed and started again")
    runner_restarts: int = Field(3, ge=0, description="times a runner that died is started again within 10 minutes; "
                                                      "the next death fails its instance")
    stream_idle_s: int = Field(30, ge=1, description="seconds a stream served by another node may hear nothing (no "
                                                    "token, no keep-alive) before it fails")
    replace_grace_s: int = Field(10, ge=0, description="seconds a node may be gone from the cluster before the master "
                                                     "places its instances again (a node back within them loses "
                                                     "nothing)")
    kv_cache_tokens: int | None = Field(None, ge=16, description="positions the KV cache holds over all sequences "
                                                               "(default: sized from the memory left after the "
                                                               "weights)")
    kv_cache_plan: int | None = Field(None, ge=16, description="positions placement counted for an instance's KV "
                                                             "cache (Instance.kv_cache_tokens): its engines hold no "
                                                             "more, and one context at least")

    @classmethod
    def from_environment(cls, env: Mapping[str, str], **overrides: object) -> EngineConfig:
        """The settings in `env` (RINGLET_PRECISION, RINGLET_CPU_COMPILE=0, RINGLET_CUDA_DECODE, RINGLET_CUDA_COMPILE,
        RINGLET_MAX_BATCH, RINGLET_MAX_STEP_TOKENS, RINGLET_BURST_PAUSE_MS, RINGLET_MAX_QUEUED, RINGLET_KV_CACHE_TOKENS, RINGLET_MAX_INSTANCES,
        RINGLET_RUNNER_STALL_S, RINGLET_RUNNER_RESTARTS, RINGLET_STREAM_IDLE_S, RINGLET_REPLACE_GRACE_S), then `overrides` (a CLI flag wins);
        ValueError names the variable and what it takes."""
        values: dict[str, object] = {}
        sources: dict[str, str] = {}  # field -> the variable it came from
        for name, field, choices in ((PRECISION_ENV, "precision", PRECISIONS),
                                     (CUDA_DECODE_ENV, "cuda_decode", get_args(CudaDecode)),
                                     (CUDA_COMPILE_ENV, "cuda_compile", get_args(CudaCompile))):
            raw = env.get(name, "").strip()
            if raw:
                if raw not in choices:
                    raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
                values[field], sources[field] = raw, name
        if env.get(CPU_COMPILE_ENV, "").strip() == "0":
            values["cpu_compile"] = False
        for name, field in ((MAX_BATCH_ENV, "max_batch"), (MAX_STEP_TOKENS_ENV, "max_step_tokens"),
                            (BURST_PAUSE_ENV, "burst_pause_ms"), (MAX_QUEUED_ENV, "max_queued"),
                            (KV_CACHE_TOKENS_ENV, "kv_cache_tokens"), (MAX_INSTANCES_ENV, "max_instances"),
                            (RUNNER_STALL_ENV, "runner_stall_s"), (RUNNER_RESTARTS_ENV, "runner_restarts"),
                            (STREAM_IDLE_ENV, "stream_idle_s"), (REPLACE_GRACE_ENV, "replace_grace_s")):
            raw = env.get(name, "").strip()
            if raw:
                if not raw.isdigit():
                    raise ValueError(f"{name}={raw!r} is not a whole number")
                values[field], sources[field] = int(raw), name
        flags = {k: v for k, v in overrides.items() if v is not None}
        values.update(flags)
        for field in flags:
            sources.pop(field, None)
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(map(str, first["loc"]))
            where = f"{sources[field]}={values[field]!r}" if field in sources else field
            raise ValueError(f"{where}: {first['msg']}") from None
