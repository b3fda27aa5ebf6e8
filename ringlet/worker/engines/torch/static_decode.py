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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ringlet.models.cache import StaticKVCache
from ringlet.shared.config import CudaCompile, EngineConfig

if TYPE_CHECKING:
    from ringlet.models.llama import Transformer

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


def compile_step(step, level: CudaCompile = "tuned", dynamic: bool = False):
    """torch.compile `step` whole; `level` (EngineConfig.cuda_compile) sets how hard inductor tunes its kernels."""
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = level != "default"
    mode = "max-autotune-no-cudagraphs" if level == "max-autotune" else None  # graphs are captured here
    return torch.compile(step, fullgraph=True, mode=mode, dynamic=dynamic or None)


def fused_step(model: nn.Module, cache: StaticKVCache, token: torch.Tensor, position: torch.Tensor):
    """The fused Triton decode step of `model`, or None (no Triton, or a model it cannot run: the reason is
    logged)."""
    try:
        from ringlet.worker.engines.torch.fused_decode import FusedDecodeStep, unsupported_reason
    except ImportError as error:
        log.info("fused decode step unavailable (%s); compiling the model's step instead", error)
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fused decode step not used (%s); compiling the model's step instead", reason)
        return None
    return FusedDecodeStep(cast("Transformer", model), cache, token, position)  # unsupported_reason checked it


def use_persistent_compile_caches(home: Path) -> None:
    """Keep torch.compile's and Triton's artefacts under `home`/cache, so a restart reuses them (seconds, not
    minutes), unless TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR name places of their own. Called where a process
    that compiles starts (a runner, `ringlet run`, `ringlet bench`): the libraries read these variables."""
    places = [home / "cache" / "inductor", home / "cache" / "triton"]
    try:
        for place in places:
            place.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only home, say: the libraries keep their defaults (a temporary folder)
        log.warning("torch.compile's caches stay in a temporary folder, since %s cannot be written (%s); set "
                    "RINGLET_HOME to a writable folder to keep them across restarts", home, error.strerror or error)
        return
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # inductor writes its default into the variable once it has used it: that is no place of the user's (and
    # without inductor imported, it cannot have; importing it takes seconds that an eager engine does not spend)
    if current is None or ("torch._inductor" in sys.modules and _is_inductor_default(current)):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(places[0])
    os.environ.setdefault("TRITON_CACHE_DIR", str(places[1]))


def _is_inductor_default(path: str) -> bool:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(path) == os.path.abspath(default_cache_dir())


class StaticDecoder:
    """Decode steps of `model` (a whole model: token in, logits out) with static shapes.

    `capture`: replay each bucket from a CUDA graph (GPUs). Without graphs the compiled step runs directly; on a
    CPU it is compiled by `warm` (engine warm-up) and used from then on (`ready`).
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, context_length: int, compile: bool = True,
                 capture: bool = True, config: EngineConfig = EngineConfig()) -> None:
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.on_cpu = device.type == "cpu"
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.buckets = linear_buckets(context_length) if self.on_cpu else buckets_for(context_length)
        # built now, not inside the graph
        cast("Transformer", model)._rope(0, context_length, next(model.parameters()).dtype)
        fused = capture and not self.on_cpu and config.cuda_decode == "fused"
        self.fused = fused_step(model, cache, self.token, self.position) if fused else None
        if self.fused is not None:
            self.step, self.buckets = self.fused, [context_length]  # it attends the positions so far, any length
        elif compile:
            self.step = compile_step(self._step, config.cuda_compile, dynamic=self.on_cpu)
        else:
            self.step = self._step
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: torch.cuda._POOL_HANDLE | None = None
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
            log.info("compiling the CPU decode step (minutes on a first start; cached for later ones)")
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
