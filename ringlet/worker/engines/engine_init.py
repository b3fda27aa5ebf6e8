"""Build, warm up and run the engine of an instance; the engine is the instance's, decided once."""

from __future__ import annotations

from collections.abc import Iterator

from ringlet.shared.instances import BoundInstance
from ringlet.shared.tasks import GenerationChunk, TextGenerationTask
from ringlet.worker.engines.base import Engine


def initialize_engine(bound: BoundInstance) -> Engine:
    shard = bound.shard
    if not (shard.is_first and shard.is_last):
        raise NotImplementedError("multi-stage instances are run by the pipeline runner")
    if bound.engine in ("cpu", "cuda"):
        from ringlet.worker.engines.torch.engine import TorchEngine

        return TorchEngine.load(bound.instance.model, device=bound.engine)
    raise ValueError(f"engine {bound.engine!r} is not available in this build")


def warmup_engine(engine: Engine) -> float:
    return engine.warmup()


def generate_with_engine(engine: Engine, task: TextGenerationTask) -> Iterator[GenerationChunk]:
    return engine.generate(task)
