"""Decode steps replayed from CUDA graphs.

One decoding step launches a few hundred small kernels; at batch 1 their launch cost rivals the time
spent reading weights. A CUDA graph replays all of them with one launch. Shapes inside a graph are
fixed, so the step attends over a fixed number of cache positions (a bucket: 256, 512, ... up to the
context) under a mask, and the token and position live in static device buffers. The step itself is
compiled with torch.compile, which fuses the element-wise work (norms, rotary, SiLU) into fewer kernels.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from ringlet.models.cache import StaticKVCache

log = logging.getLogger(__name__)


def buckets_for(context_length: int, smallest: int = 256) -> list[int]:
    sizes, size = [], smallest
    while size < context_length:
        sizes.append(size)
        size *= 2
    return sizes + [context_length]


# RINGLET_CUDA_COMPILE: how hard inductor tunes the decode step at warm-up.
#   default: inductor's heuristics; tuned: + coordinate-descent tuning of each generated kernel's launch
#   parameters; max-autotune: + benchmarked choice between cuBLAS and Triton templates for every matmul.
COMPILE_ENV = "RINGLET_CUDA_COMPILE"
COMPILE_LEVELS = ("default", "tuned", "max-autotune")
DEFAULT_COMPILE_LEVEL = "tuned"  # H200, 1B shape with decode_attention: +12% steps/s over default, 2.5x the warm-up


def compile_step(step, level: str | None = None):  # type: ignore[no-untyped-def]
    level = level or os.environ.get(COMPILE_ENV, DEFAULT_COMPILE_LEVEL)
    if level not in COMPILE_LEVELS:
        raise ValueError(f"{COMPILE_ENV}={level!r} is not one of {', '.join(COMPILE_LEVELS)}")
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = level != "default"
    mode = "max-autotune-no-cudagraphs" if level == "max-autotune" else None  # graphs are captured here
    return torch.compile(step, fullgraph=True, mode=mode)


def use_persistent_compile_cache() -> None:
    """Keep torch.compile's artefacts under RINGLET_HOME, so a restart reuses them (seconds, not minutes)."""
    home = Path(os.environ.get("RINGLET_HOME", Path.home() / ".ringlet"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home / "cache" / "inductor"))


class GraphedDecoder:
    def __init__(self, model: nn.Module, cache: StaticKVCache, context_length: int, compile: bool = True,
                 capture: bool = True) -> None:
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.buckets = buckets_for(context_length)
        model._rope(0, context_length, next(model.parameters()).dtype)  # built now, not inside the graph
        if compile:
            use_persistent_compile_cache()
        self.step = compile_step(self._step) if compile else self._step
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.use_graphs = capture  # False: the same static-shape step, run eagerly (a reference for tests)

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

    def capture_all(self) -> float:
        began = time.perf_counter()
        if not self.use_graphs:
            return 0.0
        for i, kv_len in enumerate(self.buckets):
            if kv_len not in self.graphs:
                self.capture(kv_len)
            log.info("CUDA graph %d/%d captured (attends %d positions), %.1f s", i + 1, len(self.buckets), kv_len,
                     time.perf_counter() - began)
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
