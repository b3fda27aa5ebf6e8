"""Load a whole model on this machine with a named (or the best) engine: for `ringlet run` and `bench`."""

from __future__ import annotations

from pathlib import Path

from ringlet.worker.engines.base import Engine


def load_local_engine(model: str | Path | None, engine: str | None = None, **options: object) -> Engine:
    """`engine` (or $RINGLET_ENGINE, or the best available one); an unavailable engine is a ValueError
    that lists the available ones."""
    from ringlet.worker.engines.engine_init import load_best_engine

    return load_best_engine(model, engine, **options)
