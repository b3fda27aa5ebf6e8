"""The engine registry: lazy factories by name, the instance's engine decided once, bench's load_engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ringlet.shared.instances import BoundInstance, Instance, Shard
from ringlet.worker.engines.engine_init import ENGINES, initialize_engine, load_engine
from ringlet.worker.engines.engine_utils import EngineUnavailableError, detect_available_engines


def test_every_engine_is_registered_and_imported_only_when_built() -> None:
    assert ENGINES.names() == ["cpu", "cuda", "ipex", "mlx"]
    # a fresh interpreter: importing the registry (and detecting) imports no engine module
    code = ("import sys; from ringlet.worker.engines import engine_init; "
            "print(sorted(m for m in sys.modules if m.startswith(('ringlet.worker.engines.', 'mlx_lm'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['ringlet.worker.engines.base', 'ringlet.worker.engines.engine_init', " \
                             "'ringlet.worker.engines.engine_utils']"


def test_unknown_engine_name_is_an_error_listing_the_names() -> None:
    with pytest.raises(ValueError, match="unknown engine 'tpu'"):
        load_engine("tpu")


def test_explicit_unavailable_engine_lists_the_available_ones(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ringlet.worker.engines.engine_init import load_best_engine

    monkeypatch.delenv("RINGLET_ENGINE", raising=False)
    missing = next(s.engine for s in detect_available_engines() if not s.available)  # no machine has all four
    with pytest.raises(EngineUnavailableError, match=rf"engine '{missing}' is not available here.*Available here: .*cpu"):
        load_best_engine(None, missing)


def test_multi_stage_shards_are_not_built_here() -> None:
    shards = [Shard(node_id="n1", rank=0, start=0, end=10, num_layers=30),
              Shard(node_id="n2", rank=1, start=10, end=30, num_layers=30)]
    instance = BoundInstance(instance=Instance(instance_id="i2", model="default", instance_type="CpuRing",
                                               shards=shards), node_id="n1")
    with pytest.raises(NotImplementedError, match="pipeline runner"):
        initialize_engine(instance)
