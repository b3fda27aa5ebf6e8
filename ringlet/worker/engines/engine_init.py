"""Build, warm up and run engines: a registry of engine factories that import their engine lazily.

A missing optional dependency (mlx, IPEX, a CUDA build of torch) therefore only removes that engine.
The engine of a shard is its instance's, decided once here; if it cannot run on this node the next
engine in priority order takes over, with one log line saying why and how to fix it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ringlet.shared.instances import BoundInstance, EngineType
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import Engine
from ringlet.worker.engines.engine_utils import (
    PRECISION_ENV,
    PROBES,
    ProbeInputs,
    detect_available_engines,
    fallback_engine,
    parse_engine_name,
    select_best_engine,
)

log = logging.getLogger(__name__)

ModelRef = str | Path | None
EngineFactory = Callable[..., Engine]  # factory(model, **options) -> a loaded engine


class EngineRegistry:
    """Engine name -> factory. Factories import their engine module only when called."""

    def __init__(self) -> None:
        self._factories: dict[EngineType, EngineFactory] = {}

    def register(self, name: EngineType) -> Callable[[EngineFactory], EngineFactory]:
        def add(factory: EngineFactory) -> EngineFactory:
            self._factories[name] = factory
            return factory
        return add

    def factory(self, name: EngineType) -> EngineFactory:
        if name not in self._factories:
            raise ValueError(f"no engine {name!r} is registered; registered: {', '.join(sorted(self._factories))}")
        return self._factories[name]

    def names(self) -> list[EngineType]:
        return sorted(self._factories)


ENGINES = EngineRegistry()


@ENGINES.register("cpu")
def _cpu_engine(model: ModelRef, **options: Any) -> Engine:
    from ringlet.worker.engines.torch.engine import TorchEngine

    return TorchEngine.load(model, device="cpu", **options)


@ENGINES.register("cuda")
def _cuda_engine(model: ModelRef, **options: Any) -> Engine:
    from ringlet.worker.engines.torch.engine import TorchEngine

    return TorchEngine.load(model, device=options.pop("device", "cuda"), **options)


@ENGINES.register("ipex")
def _ipex_engine(model: ModelRef, **options: Any) -> Engine:
    from ringlet.worker.engines.ipex.engine import IpexEngine

    return IpexEngine.load(model, **options)


@ENGINES.register("mlx")
def _mlx_engine(model: ModelRef, **options: Any) -> Engine:
    from ringlet.worker.engines.mlx.engine import MlxEngine

    return MlxEngine.load(model, **options)


def load_engine(engine_type: str, model: ModelRef = None, **options: Any) -> Engine:
    """Build an engine by name ("cpu", "cuda", "ipex", "mlx", an alias like "xpu", or "auto") for a whole model.

    Options go to the engine's loader, e.g. precision="bf16", or device="cpu" for IPEX's CPU backend.
    """
    engine = parse_engine_name(engine_type) or select_best_engine()
    return ENGINES.factory(engine)(model, **options)


def load_best_engine(model: ModelRef = None, requested: str | None = None, **options: Any) -> Engine:
    """`requested` (or $RINGLET_ENGINE, or the best available); an unavailable one is an error listing the others."""
    return load_engine(select_best_engine(requested), model, **options)


def initialize_engine(bound: BoundInstance, probes: ProbeInputs | None = None, **options: Any) -> Engine:
    shard = bound.shard
    if not (shard.is_first and shard.is_last):
        raise NotImplementedError("multi-stage instances are run by the pipeline runner")
    engine = bound.engine
    probes = probes or ProbeInputs()
    status = PROBES[engine](probes)
    if not status.available:
        assert status.problem is not None
        engine = fallback_engine(engine, detect_available_engines(probes))
        log.warning("instance %s: engine %s cannot run here (%s; fix: %s); running on %s instead",
                    bound.instance.instance_id, bound.engine, status.problem.reason, status.problem.fix, engine)
        options = {}  # the options were meant for the engine that cannot run
    if PRECISION_ENV in os.environ:  # as the stages of a multi-stage instance do (pipeline.load_for_stage)
        options.setdefault("precision", os.environ[PRECISION_ENV])
    return ENGINES.factory(engine)(bound.instance.model, **options)


def warmup_engine(engine: Engine) -> float:
    return engine.warmup()


def generate_with_engine(engine: Engine, task: TextGenerationTask) -> Iterator[GenerationChunk]:
    return engine.generate(task)
