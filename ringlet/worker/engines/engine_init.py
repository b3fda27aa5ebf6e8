"""The front door of the engines: build (`initialize_engine`), warm up (`warmup_engine`) and run
(`generate_with_engine`) the engine of a single-stage instance. The runner uses these, and so do `ringlet run` and
`ringlet bench` for a model on this machine (`local_instance`).

A registry of factories imports each engine only when it is built, so a missing optional dependency (mlx, IPEX, a
CUDA build of torch) only removes that engine. The engine of a shard is its instance's, decided once at placement;
if it cannot run on this node the next engine in priority order takes over, with one log line saying why and how to
fix it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Protocol

from ringlet.models.loader import read_model_config, resolve_model_path
from ringlet.models.mlx_only import check_mlx_architecture, config_shape
from ringlet.models.safetensors_loader import read_config
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import (
    BoundInstance,
    EngineType,
    Instance,
    IpexOptimizationLevel,
    Shard,
    single_node_type,
)
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import Engine, GeneratesText
from ringlet.worker.engines.engine_utils import (
    PROBES,
    ProbeInputs,
    detect_available_engines,
    fallback_engine,
)

log = logging.getLogger(__name__)

EngineFactory = Callable[[BoundInstance, EngineConfig], Engine]


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
@ENGINES.register("cuda")
def _torch_engine(bound: BoundInstance, config: EngineConfig) -> Engine:
    from ringlet.worker.engines.torch.batch_engine import initialize_torch

    return initialize_torch(bound, config)


@ENGINES.register("ipex")
def _ipex_engine(bound: BoundInstance, config: EngineConfig) -> Engine:
    from ringlet.worker.engines.ipex.utils_ipex import initialize_ipex

    return initialize_ipex(bound, config)


@ENGINES.register("mlx")
def _mlx_engine(bound: BoundInstance, config: EngineConfig) -> Engine:
    from ringlet.worker.engines.mlx.engine import initialize_mlx

    return initialize_mlx(bound, config)


def initialize_engine(bound: BoundInstance, config: EngineConfig = EngineConfig(),
                      probes: ProbeInputs | None = None) -> Engine:
    """The loaded engine of a single-stage instance (multi-stage instances are run by `worker/stages.py`)."""
    shard = bound.shard
    if not (shard.is_first and shard.is_last):
        raise NotImplementedError("multi-stage instances are run by the ring's stages (worker/stages.py)")
    engine = bound.engine
    probes = probes or ProbeInputs()
    status = PROBES[engine](probes)
    if not status.available:
        assert status.problem is not None
        engine = fallback_engine(engine, detect_available_engines(probes))
        log.warning("instance %s: engine %s cannot run here (%s; fix: %s); running on %s instead",
                    bound.instance.instance_id, bound.engine, status.problem.reason, status.problem.fix, engine)
        config = config.model_copy(update={"precision": "auto"})  # the precision was chosen for the other engine
        bound = bound.model_copy(update={"instance": _on_engine(bound.instance, engine)})
    return ENGINES.factory(engine)(bound, config)


class WarmsUp(Protocol):
    """An engine, or a ring's first stage (which warms the whole ring)."""

    def warmup(self) -> None: ...


def warmup_engine(engine: WarmsUp) -> float:
    """Compile, capture and touch everything once, so no request pays for it; returns the seconds it took."""
    began = time.perf_counter()
    engine.warmup()
    return time.perf_counter() - began


def generate_with_engine(engine: GeneratesText, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
    return engine.generate(task)


def local_instance(model: str | Path | None, engine: EngineType,
                   ipex_optimization: IpexOptimizationLevel = "auto") -> BoundInstance:
    """A single-stage instance of `model` (a path, a name, or None for the embedded model) on this machine, for
    the commands that run a model without a node; `ipex_optimization` applies to the ipex engine."""
    path, num_layers = _model_layers(model, engine)
    shard = Shard(node_id="local", rank=0, start=0, end=num_layers, num_layers=num_layers, engine=engine)
    instance = Instance(instance_id="local", model=str(path if model is None else model),
                        instance_type=single_node_type(engine), shards=[shard],
                        ipex_optimization_level=ipex_optimization)
    return BoundInstance(instance=instance, node_id="local")


def _model_layers(model: str | Path | None, engine: EngineType) -> tuple[Path, int]:
    """The model's path and number of layers; ModelLoadError where `engine` cannot run it: the MLX engine takes a
    Hugging Face directory of any architecture mlx-lm has, the torch engines those of ringlet's models."""
    path = resolve_model_path(model)
    if engine == "mlx" and path.is_dir():
        config = read_config(path)
        check_mlx_architecture(config)
        return path, config_shape(config).num_layers
    path, args = read_model_config(path)
    return path, args.num_hidden_layers


def _on_engine(instance: Instance, engine: EngineType) -> Instance:
    return instance.model_copy(update={"shards": [s.model_copy(update={"engine": engine, "devices": ()})
                                                 for s in instance.shards]})
