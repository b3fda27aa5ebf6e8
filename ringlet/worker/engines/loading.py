"""Load a whole model on this machine with a named (or the best) engine: for `ringlet run` and `bench`."""

from __future__ import annotations

import os
from pathlib import Path

from ringlet.worker.engines.base import Engine


def load_local_engine(model: str | Path | None, engine: str | None = None, **options: object) -> Engine:
    from ringlet.worker.engines.torch.engine import TorchEngine

    choice = engine or os.environ.get("RINGLET_ENGINE") or "cpu"
    return TorchEngine.load(model, device=choice, **options)
