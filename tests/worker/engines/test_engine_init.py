"""The engines' front door: lazy factories by name, the instance's engine decided once, a local instance for the
commands that run a model without a node."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ringlet.models.embedded import embedded_model_path
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, Instance, InstanceType, Shard
from ringlet.worker.engines.engine_init import ENGINES, initialize_engine, local_instance
from ringlet.worker.engines.engine_utils import EngineUnavailableError, detect_available_engines, select_best_engine


def test_every_engine_is_registered_and_imported_only_when_built() -> None:
    assert ENGINES.names() == ["cpu", "cuda", "ipex", "mlx"]
    # a fresh interpreter: importing the registry (and detecting) imports no engine module
    code = ("import sys; from ringlet.worker.engines import engine_init; "
            "print(sorted(m for m in sys.modules if m.startswith(('ringlet.worker.engines.', 'mlx_lm'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['ringlet.worker.engines.base', 'ringlet.worker.engines.engine_init', " \
                             "'ringlet.worker.engines.engine_utils']"


def test_unknown_engine_name_is_an_error_listing_the_names() -> None:
    with pytest.raises(ValueError, match="unknown engine 'tpu'; known: auto, mlx, ipex, cuda, cpu"):
        select_best_engine("tpu")


def test_explicit_unavailable_engine_lists_the_available_ones() -> None:
    missing = next(s.engine for s in detect_available_engines() if not s.available)  # no machine has all four
    with pytest.raises(EngineUnavailableError, match=rf"engine '{missing}' is not available here.*Available here: .*cpu"):
        select_best_engine(missing)


def test_multi_stage_shards_are_not_built_here() -> None:
    shards = [Shard(node_id="n1", rank=0, start=0, end=10, num_layers=30),
              Shard(node_id="n2", rank=1, start=10, end=30, num_layers=30)]
    instance = BoundInstance(instance=Instance(instance_id="i2", model="default", instance_type="CpuRing",
                                               shards=shards), node_id="n1")
    with pytest.raises(NotImplementedError, match="ring's stages"):
        initialize_engine(instance)


def test_a_local_instance_holds_the_whole_model_on_one_engine() -> None:
    bound = local_instance(None, "cpu")
    assert bound.instance.model == str(embedded_model_path())
    assert bound.instance.instance_type == InstanceType.CPU_RING
    assert (bound.shard.start, bound.shard.end, bound.shard.num_layers, bound.engine) == (0, 30, 30, "cpu")


@pytest.mark.slow
def test_the_engine_config_reaches_the_engine() -> None:
    engine = initialize_engine(local_instance(None, "cpu"), EngineConfig(precision="fp32", max_context=512))
    assert engine.context_length == 512
    assert engine.precision == "fp32"  # type: ignore[attr-defined]
