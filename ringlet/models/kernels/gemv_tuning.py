"""The one-row int4 tilings chosen on the GPU at hand, from the model's own weights.

`int4_cuda.gemv_tiling` gives tilings swept on an H100. How many weight bytes a program must keep in flight to
stream at a GPU's bandwidth depends on that bandwidth and the memory's latency, so another card (an H200 reads 1.4
times as fast with the same SMs; a consumer card has fewer SMs and slower memory) can be served better by others.
Before a quantised model's decode graphs are captured, each shape of its int4 projections is timed at a few tilings
around the default, each time moving to the fastest neighbour (`neighbours`: rows, words, warps, the step ahead,
stages, the register cap) while it wins by more than `MARGIN` when both are timed again. A timing launches the
kernel on every layer's weight once, back to back as a decode step launches them, so that the bytes come from
device memory and not the L2 cache. The choice is kept per GPU (name, SMs, Triton, the kernels' source) in
`$RINGLET_HOME/cache/gemv-tilings.json`, so a later load compiles and times nothing; `RINGLET_TUNE_GEMV=0` keeps the
defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ringlet.models.kernels import int4_cuda
from ringlet.models.kernels.int4_cuda import GemvTiling
from ringlet.models.store import ringlet_home

if TYPE_CHECKING:
    from ringlet.models.quant_cuda import CudaInt4Linear

log = logging.getLogger(__name__)

TUNE_ENV = "RINGLET_TUNE_GEMV"
MARGIN = 0.02  # the fraction a move must win by when both tilings are timed again (the median of three runs each)
ROUNDS = 3  # moves from the default at most
L2_COPIES = 4  # a shape is timed only where its layers' weights fill the L2 cache this many times over
CACHE_VERSION = 1


@dataclass(frozen=True)
class Projection:
    """One shape of int4 projection a decode step launches, with what the step fuses into it, and its layers."""

    n: int  # output columns (gate/up: of the gated output, the weight holding 2n rows)
    k: int
    group: int
    gated: bool
    norm: bool
    residual: bool
    layers: tuple[CudaInt4Linear, ...]  # one a layer

    @property
    def key(self) -> str:
        return f"{self.n}x{self.k}/{self.group}" + ("/gated" if self.gated else "")

    @property
    def weight_bytes(self) -> int:
        return sum(int(lay.packed.numel() + 2 * lay.scale.numel() * 2) for lay in self.layers)


def valid(t: GemvTiling, k: int, group: int) -> bool:
    """Whether the kernel takes tiling `t` for rows of `k` columns in groups of `group` (whole groups a step, at
    least a word a thread, at most 8,192 words a program's step; shared-memory stages without the step ahead or a
    register cap)."""
    return (t.block_n >= 4 and t.words >= 4 and t.words % 4 == 0 and (k // 8) % t.words == 0
            and (8 * t.words) % group == 0 and t.warps * 128 <= t.block_n * t.words <= 8192
            and (t.stages == 1 or (not t.ahead and t.registers is None)))


def neighbours(t: GemvTiling, k: int, group: int) -> list[GemvTiling]:
    """The tilings one change away from `t` that the kernel takes: half and twice the rows and the words, the step
    ahead toggled, two shared-memory stages or one, the other number of warps, another register cap."""
    changed = [
        dataclasses.replace(t, block_n=t.block_n * 2),
        dataclasses.replace(t, block_n=t.block_n // 2),
        dataclasses.replace(t, words=t.words * 2),
        dataclasses.replace(t, words=t.words // 2),
        dataclasses.replace(t, ahead=not t.ahead, stages=1),
        dataclasses.replace(t, ahead=False, stages=2 if t.stages == 1 else 1, registers=None),
        dataclasses.replace(t, warps=4 if t.warps == 8 else 8),
        *(dataclasses.replace(t, registers=cap) for cap in (None, 64, 80) if cap != t.registers),
    ]
    found: list[GemvTiling] = []
    for other in changed:
        if other != t and other not in found and valid(other, k, group):
            found.append(other)
    return found


Timer = Callable[[Projection, GemvTiling], float]


def gpu_key(device: torch.device) -> str:
    """What a tiling's speed depends on besides the shape: the GPU, the Triton that compiles the kernel and the
    kernel's source."""
    import triton

    properties = torch.cuda.get_device_properties(device)
    source = Path(str(int4_cuda._kernels().__file__)).read_bytes()
    return (f"{properties.name}, {properties.multi_processor_count} SMs, triton {triton.__version__}, "
            f"kernels {hashlib.sha256(source).hexdigest()[:12]}")


def cache_path() -> Path:
    return ringlet_home() / "cache" / "gemv-tilings.json"


def _read(path: Path) -> dict[str, dict[str, dict[str, object]]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("ignoring the int4 tiling cache %s (%s); tuning again", path, error)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("gpus"), dict):
        return {}
    return data["gpus"]


def _write(path: Path, gpus: dict[str, dict[str, dict[str, object]]]) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps({"version": CACHE_VERSION, "gpus": gpus}, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot write the int4 tiling cache %s (%s); the next load tunes again", path, error)
        with contextlib.suppress(OSError):
            temporary.unlink()


def _tiling(entry: object) -> GemvTiling | None:
    try:
        return GemvTiling(**entry) if isinstance(entry, dict) else None
    except TypeError:
        return None


def choose(projection: Projection, start: GemvTiling, timer: Timer, rounds: int = ROUNDS) -> GemvTiling:
    """From `start` (the default), the fastest neighbour by `timer` while it beats the current tiling by more than
    MARGIN when both are timed again, three times each in turn; at most `rounds` moves."""
    p = projection
    current = start
    seconds = {current: timer(p, current)}
    for _ in range(rounds):
        for t in neighbours(current, p.k, p.group):
            if t not in seconds:
                seconds[t] = timer(p, t)
        best = min(seconds, key=lambda t: seconds[t])
        if best == current:
            break
        again: dict[GemvTiling, list[float]] = {current: [], best: []}
        for _ in range(3):
            for t in (current, best):
                again[t].append(timer(p, t))
        seconds[current], seconds[best] = statistics.median(again[current]), statistics.median(again[best])
        if seconds[best] >= (1 - MARGIN) * seconds[current]:
            break
        current = best
    return current


def tune(projections: Sequence[Projection], device: torch.device, sms: int | None = None, timer: Timer | None = None,
         path: Path | None = None, key: str | None = None) -> dict[str, GemvTiling]:
    """Each projection's tiling on `device` of `sms` SMs (cached, else timed by `timer`, by default `time_tiling`),
    registered with `int4_cuda` for the kernels' launches on that device; returns them by the projections' keys."""
    if os.environ.get(TUNE_ENV, "1") == "0":
        return {}
    if sms is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    path = path or cache_path()
    key = key or gpu_key(device)
    gpus = _read(path)
    known = gpus.get(key, {})
    chosen: dict[str, GemvTiling] = {}
    timed: list[str] = []
    for p in projections:
        cached = _tiling(known.get(p.key))
        if cached is None:
            if not timed:
                log.info("timing int4 tilings for %s (once for this GPU; kept in %s)", key, path)
            began = time.perf_counter()
            default = int4_cuda.gemv_tiling(p.n, p.k, p.group, p.gated, sms)
            cached = choose(p, default, timer or time_tiling)
            timed.append(p.key)
            log.info("int4 [%d, %d]%s: %s%s (%.1f s)", p.n, p.k, " gated" if p.gated else "", cached,
                     "" if cached == default else f", not the default {default}", time.perf_counter() - began)
        chosen[p.key] = cached
        int4_cuda.use_tiling(device, p.n, p.k, p.group, p.gated, cached)
    if timed:
        gpus = _read(path)  # another process may have written its shapes meanwhile
        gpus.setdefault(key, {}).update({k: dataclasses.asdict(chosen[k]) for k in timed})
        _write(path, gpus)
    return chosen


def worth_timing(projection: Projection, device: torch.device) -> bool:
    """Whether the projection's layers hold enough bytes for a timing that reads them from device memory."""
    return projection.weight_bytes >= L2_COPIES * torch.cuda.get_device_properties(device).L2_cache_size


def time_tiling(projection: Projection, tiling: GemvTiling, passes: int = 3) -> float:
    """Seconds one launch at `tiling` takes, from a CUDA graph of `passes` passes over every layer's weight (each
    launch reading another layer's, as a decode step does), launched with PDL where the GPU has it."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    device = projection.layers[0].packed.device
    pdl = int4_cuda.pdl_available(device)
    x = torch.randn(1, projection.k, dtype=torch.bfloat16, device=device)
    norm = torch.ones(projection.k, dtype=torch.bfloat16, device=device) if projection.norm else None
    outs = [torch.zeros(1, projection.n, dtype=torch.bfloat16, device=device) for _ in projection.layers]

    def run() -> None:
        for layer, out in zip(projection.layers, outs):
            int4_cuda._int4_gemv_rows(x, layer.packed, layer.scale, layer.offset, projection.group, out,
                                      projection.n, projection.k, None, norm, 1e-5, projection.gated,
                                      projection.residual, pdl, tiling)

    try:
        run()  # compiles the tiling outside the capture
    except (CompilationError, OutOfResources):  # a tiling this GPU or compiler refuses
        return float("inf")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(passes):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    times = []
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times) / (passes * len(projection.layers))
