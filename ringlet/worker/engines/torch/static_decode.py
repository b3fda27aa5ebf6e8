"""The decode step with static shapes: compiled, and on GPUs replayed from CUDA graphs.

One decoding step launches a few hundred small kernels; at batch 1 their launch cost rivals the time
spent reading weights. A CUDA graph replays all of them with one launch. Shapes inside a graph are
fixed, so the step attends over a fixed number of cache positions (a bucket: 256, 512, ... up to the
context) under a mask, and the token and position live in static device buffers. The step itself is
compiled with torch.compile, which fuses the element-wise work (norms, rotary, SiLU) into fewer kernels. For
Llama-family models on a CUDA GPU the step is instead a few hand-fused Triton kernels (fused_decode.py) whose
attention reads the position from the device: one graph serves every position.

On CPUs there are no graphs, and the per-operator cost of eager PyTorch is the same problem: about 1200
operators a step for the embedded model, half of a decode step's time next to the int4 matmuls. There the
step is compiled once with a symbolic number of cache positions (buckets every 128 positions, none of them
recompiled) at warm-up; until then, or if compiling fails (no C++ compiler), decoding stays eager.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from ringlet.models.cache import StaticKVCache
from ringlet.models.store import ringlet_home

log = logging.getLogger(__name__)


def buckets_for(context_length: int, smallest: int = 256) -> list[int]:
    """Doubling sizes: one CUDA graph each."""
    sizes, size = [], smallest
    while size < context_length:
        sizes.append(size)
        size *= 2
    return sizes + [context_length]


def linear_buckets(context_length: int, step: int = 128) -> list[int]:
    """Every `step` positions: a symbolic size compiles once, so attention never reads much past the sequence."""
    return list(range(step, context_length, step)) + [context_length]


# RINGLET_CUDA_COMPILE: how hard inductor tunes the decode step at warm-up.
#   default: inductor's heuristics; tuned: + coordinate-descent tuning of each generated kernel's launch
#   parameters; max-autotune: + benchmarked choice between cuBLAS and Triton templates for every matmul.
COMPILE_ENV = "RINGLET_CUDA_COMPILE"
COMPILE_LEVELS = ("default", "tuned", "max-autotune")
DEFAULT_COMPILE_LEVEL = "tuned"  # H200, 1B shape with decode_attention: +12% steps/s over default, 2.5x the warm-up


def compile_step(step, level: str | None = None, dynamic: bool = False):  # type: ignore[no-untyped-def]
    level = level or os.environ.get(COMPILE_ENV, DEFAULT_COMPILE_LEVEL)
    if level not in COMPILE_LEVELS:
        raise ValueError(f"{COMPILE_ENV}={level!r} is not one of {', '.join(COMPILE_LEVELS)}")
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = level != "default"
    mode = "max-autotune-no-cudagraphs" if level == "max-autotune" else None  # graphs are captured here
    return torch.compile(step, fullgraph=True, mode=mode, dynamic=dynamic or None)


# RINGLET_CUDA_DECODE: which decode step a CUDA graph replays.
#   fused: Triton kernels, six a layer (fused_decode.py), where the model allows; compiled: the model's own forward
#   through torch.compile (every architecture; the fallback).
DECODE_ENV = "RINGLET_CUDA_DECODE"
DECODE_STEPS = ("fused", "compiled")


def fused_step(model: nn.Module, cache: StaticKVCache, token: torch.Tensor, position: torch.Tensor):  # type: ignore[no-untyped-def]
    """The fused Triton decode step of `model`, or None (asked for the compiled step, no Triton, or a model it cannot
    run: the reason is logged)."""
    choice = os.environ.get(DECODE_ENV, "fused")
    if choice not in DECODE_STEPS:
        raise ValueError(f"{DECODE_ENV}={choice!r} is not one of {', '.join(DECODE_STEPS)}")
    if choice != "fused":
        return None
    try:
        from ringlet.worker.engines.torch.fused_decode import FusedDecodeStep, unsupported_reason
    except ImportError as error:
        log.info("fused decode step unavailable (%s); compiling the model's step instead", error)
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fused decode step not used (%s); compiling the model's step instead", reason)
        return None
    return FusedDecodeStep(model, cache, token, position)


def use_persistent_compile_cache() -> None:
    """Keep torch.compile's artefacts under RINGLET_HOME, so a restart reuses them (seconds, not minutes), unless
    TORCHINDUCTOR_CACHE_DIR names a place of its own (inductor sets its /tmp default there on first use)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ringlet_home() / "cache" / "inductor")


class StaticDecoder:
    """Decode steps of `model` (a whole model: token in, logits out) with static shapes.

    `capture`: replay each bucket from a CUDA graph (GPUs). Without graphs the compiled step runs directly; on a
    CPU it is compiled by `warm` (engine warm-up) and used from then on (`ready`).
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, context_length: int, compile: bool = True,
                 capture: bool = True) -> None:
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.on_cpu = device.type == "cpu"
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.buckets = linear_buckets(context_length) if self.on_cpu else buckets_for(context_length)
        model._rope(0, context_length, next(model.parameters()).dtype)  # built now, not inside the graph
        self.fused = fused_step(model, cache, self.token, self.position) if capture and not self.on_cpu else None
        if self.fused is not None:
            self.step, self.buckets = self.fused, [context_length]  # it attends the positions so far, any length
        elif compile:
            use_persistent_compile_cache()
            self.step = compile_step(self._step, dynamic=self.on_cpu)
        else:
            self.step = self._step
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.use_graphs = capture and not self.on_cpu  # False: the same step without graphs (also a test reference)
        self.ready = not (self.on_cpu and compile)  # a CPU step is compiled at warm-up, not by a user's request

    def _step(self, kv_len: int) -> torch.Tensor:
        return self.model(self.token, self.cache, self.position, last_logits_only=True, kv_len=kv_len)[:, -1]

    def bucket(self, position: int) -> int:
        for size in self.buckets:
            if position < size:
                return size
        raise ValueError(f"position {position} is past the context of {self.buckets[-1]}")

    @torch.inference_mode()
    def capture(self, kv_len: int) -> None:
        # warm-up runs (compilation, cuBLAS workspaces) on a side stream, as CUDA graph capture requires;
        # they rewrite the current token's keys/values with the same values, so the cache stays valid
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(kv_len)
        self.pool = graph.pool()
        self.graphs[kv_len] = (graph, out)

    def warm(self) -> float:
        """Capture every bucket's graph (GPUs) or compile the step (CPUs), before any request needs them.

        A compiled step writes the keys and values of the token in its buffer (position 0): the engine's
        warm-up request then overwrites them. Returns the seconds it took."""
        began = time.perf_counter()
        if self.use_graphs:
            for i, kv_len in enumerate(self.buckets):
                if kv_len not in self.graphs:
                    self.capture(kv_len)
                log.info("CUDA graph %d/%d of the %s step captured (up to %d positions), %.1f s", i + 1,
                         len(self.buckets), "fused" if self.fused else "compiled", kv_len, time.perf_counter() - began)
        elif not self.ready:
            log.info("compiling the CPU decode step (minutes on a first start; cached under %s)",
                     os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
            try:
                with torch.inference_mode():
                    self.step(self.buckets[0])
            # any failure (no C++ compiler, an inductor limitation) leaves eager decoding, which always works
            except Exception as error:  # noqa: BLE001
                log.warning("the CPU decode step could not be compiled, decoding eagerly: %s: %s",
                            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
                return time.perf_counter() - began
            self.ready = True
            log.info("CPU decode step compiled in %.1f s", time.perf_counter() - began)
        return time.perf_counter() - began

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, V] of the token at `position`; valid until the next call."""
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        kv_len = self.bucket(position)
        if not self.use_graphs:
            return self.step(kv_len)
        if kv_len not in self.graphs:
            self.capture(kv_len)
        graph, out = self.graphs[kv_len]
        graph.replay()
        return out
