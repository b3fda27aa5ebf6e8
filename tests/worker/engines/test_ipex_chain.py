"""A shard split over two Intel GPUs of one node (fake ones, whose tensors live on the CPU): each device's memory
check, a step through both devices' layers, and a fallback of one device that the stream survives."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ringlet.models.loader import read_model_config
from ringlet.models.paged_cache import SequenceStep
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, DeviceLayers, Instance, Shard
from ringlet.worker.engines.ipex import IPEXMemoryError
from ringlet.worker.engines.ipex.chain import IpexChain
from ringlet.worker.engines.ipex.utils_ipex import estimate_bytes, initialize_ipex, ipex_engine_of, load_ipex_parts
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.engine import load_torch_stage
from ringlet.worker.pipeline import StageInputs, _forward, load_stage_engine
from ringlet.worker.runner import fallback_of, running_engine
from tests.support.greedy import greedy_task, run_greedy
from tests.support.xpu import ARC_A770, INTEL_ARC_ON_BUS, FakeDevice, FakeXpu, GiB, probes

SETTINGS = EngineConfig(precision="fp32", kv_cache_tokens=4096)  # the fake GPUs' memory is the host's
DEVICE_LOST = "Native API failed. Native API returns: -36 (UR_RESULT_ERROR_DEVICE_LOST)"
GUARD_LOGGER = "ringlet.worker.engines.ipex.generator.generate"
SPLIT = 12  # of the embedded model's 30 layers, on the first device


def split_instance(shards: int = 1) -> Instance:
    """The embedded model on node n1, layers 0-11 on xpu:0 and 12-29 on xpu:1; `shards` 2: a ring whose second
    stage, on n2, is not split."""
    end = 30 if shards == 1 else 20
    first = Shard(node_id="n1", rank=0, start=0, end=end, num_layers=30, engine="ipex",
                  devices=(DeviceLayers(device=0, start=0, end=SPLIT), DeviceLayers(device=1, start=SPLIT, end=end)))
    rest = [] if shards == 1 else [Shard(node_id="n2", rank=1, start=end, end=30, num_layers=30, engine="ipex")]
    return Instance(instance_id="split", model="default", instance_type="IpexRing", shards=[first, *rest],
                    ipex_optimization_level="eager")


def two_gpus(free_second: int | None = None) -> FakeXpu:
    return FakeXpu(devices=[FakeDevice(ARC_A770, 16 * GiB), FakeDevice(ARC_A770, 16 * GiB, free=free_second)])


@pytest.mark.slow
def test_a_shard_split_over_two_gpus_generates_as_the_cpu_engine_does(tmp_path: Path, cpu_reference) -> None:  # type: ignore[no-untyped-def]
    engine = initialize_ipex(BoundInstance(instance=split_instance(), node_id="n1"), SETTINGS,
                             probes=probes(tmp_path, two_gpus(), INTEL_ARC_ON_BUS))
    assert isinstance(engine, IpexChain)
    assert [(p.compute.index, p.stage.start, p.stage.end) for p in engine.parts] == [(0, 0, SPLIT), (1, SPLIT, 30)]
    assert len({p.num_blocks for p in engine.parts}) == 1 and engine.num_blocks == engine.parts[0].num_blocks
    assert (engine.name, engine.optimization, engine.fallback_reason) == (
        "ipex", "eager (native torch.xpu, no IPEX, not compiled)", None)
    assert run_greedy(engine, greedy_task()) == cpu_reference  # the same fp32 kernels, split over two devices


@pytest.mark.slow
def test_one_gpu_of_the_split_failing_moves_its_layers_to_the_cpu_and_the_stream_goes_on(
        tmp_path: Path, cpu_reference, caplog) -> None:  # type: ignore[no-untyped-def]
    gpus = two_gpus()
    engine = initialize_ipex(BoundInstance(instance=split_instance(), node_id="n1"), SETTINGS,
                             probes=probes(tmp_path, gpus, INTEL_ARC_ON_BUS))
    assert isinstance(engine, IpexChain)
    gpus.fail(*(RuntimeError(DEVICE_LOST) for _ in range(4)), after=20, device=1)
    with caplog.at_level(logging.WARNING):
        assert run_greedy(engine, greedy_task()) == cpu_reference
    [line] = [r.getMessage() for r in caplog.records if r.name == GUARD_LOGGER]
    assert line.startswith("ipex: xpu:1 (Intel(R) Arc(TM) A770 Graphics) failed 4 times in a row")
    assert "layers 12-29 of this instance now runs on the CPU engine" in line
    first, second = engine.parts
    assert (first.name, second.name, engine.name) == ("ipex", "cpu", "ipex"), "xpu:0 keeps its layers"
    assert engine.fallback_reason is not None and engine.fallback_reason.startswith(
        "layers 12-29 on xpu:1 (Intel(R) Arc(TM) A770 Graphics): xpu:1 (Intel(R) Arc(TM) A770 Graphics) failed 4 times")
    assert engine.optimization == ("layers 0-11 on xpu:0 (Intel(R) Arc(TM) A770 Graphics): eager (native torch.xpu, "
                                   "no IPEX, not compiled); layers 12-29 on xpu:1 (Intel(R) Arc(TM) A770 Graphics): "
                                   "none (the cpu engine, after the device failed)")
    # what the runner tells the cluster: still on ipex, with the fallback of the failed device's layers
    assert running_engine(engine, "ipex") == "ipex"
    reported = fallback_of(engine, "ipex")
    assert reported is not None and reported.startswith("ipex -> cpu: layers 12-29 on xpu:1")
    assert run_greedy(engine, greedy_task(tokens=4)).generated == cpu_reference.generated[:4]


def test_each_gpu_is_checked_for_its_own_layers_before_any_weight_is_read(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def load_stage(*_: object, **__: object) -> None:
        raise AssertionError("weights read before every device was checked")

    monkeypatch.setattr("ringlet.worker.engines.ipex.utils_ipex.load_stage", load_stage)
    _, args = read_model_config(None)
    second_needs = estimate_bytes(args, "fp32", 8192, SPLIT, 30, on_host=False)
    gpus = two_gpus(free_second=second_needs - 2**20)
    with pytest.raises(IPEXMemoryError, match=r"layers 12-29 \(fp32\) needs about .* GiB on xpu:1 .* but only"):
        initialize_ipex(BoundInstance(instance=split_instance(), node_id="n1"), EngineConfig(precision="fp32"),
                        probes=probes(tmp_path, gpus, INTEL_ARC_ON_BUS))


@pytest.mark.slow
def test_a_ring_stage_split_over_two_gpus_agrees_its_cache_with_the_ring(tmp_path: Path) -> None:
    store = dist.HashStore()
    store.set("kv-cache/1", "3 4096")  # the other stage holds 3 blocks
    engine, precision = load_stage_engine(BoundInstance(instance=split_instance(shards=2), node_id="n1"), SETTINGS,
                                          store, probes=probes(tmp_path, two_gpus(), INTEL_ARC_ON_BUS))
    assert isinstance(engine, IpexChain) and precision == "fp32"
    assert [p.num_blocks for p in engine.parts] == [3, 3] and engine.context_length == 4096
    assert [(p.stage.start, p.stage.end) for p in engine.parts] == [(0, SPLIT), (SPLIT, 20)]


@pytest.mark.slow
def test_a_split_ring_stage_rebuilds_its_lost_part_and_goes_on(tmp_path: Path) -> None:
    later = Shard(node_id="n2", rank=1, start=15, end=30, num_layers=30, engine="ipex",
                  devices=(DeviceLayers(device=0, start=15, end=22), DeviceLayers(device=1, start=22, end=30)))
    ring = Instance(instance_id="ring", model="default", instance_type="IpexRing", ipex_optimization_level="eager",
                    shards=[Shard(node_id="n1", rank=0, start=0, end=15, num_layers=30, engine="ipex"), later])
    bound, gpus = BoundInstance(instance=ring, node_id="n2"), two_gpus()
    engine = ipex_engine_of(bound, SETTINGS, load_ipex_parts(bound, SETTINGS, probes(tmp_path, gpus, INTEL_ARC_ON_BUS)),
                      num_blocks=8)
    cpu = torch.device("cpu")
    reference = TorchBatchEngine(load_torch_stage(None, 15, 30, "fp32", cpu)[0], cpu, SETTINGS, num_blocks=8)
    torch.manual_seed(0)
    inputs: StageInputs | None = StageInputs(engine)
    blocks = {1: [0, 1], 2: [2, 3]}

    def step(positions: list[tuple[int, int, torch.Tensor]]) -> None:
        nonlocal inputs
        steps = [SequenceStep(start, len(x), blocks[key]) for key, start, x in positions]
        x = torch.cat([x for _, _, x in positions])
        out, inputs = _forward(engine, inputs, x, steps, [key for key, _, _ in positions])
        assert torch.allclose(out, reference.forward_batch(x, steps), atol=1e-4)

    step([(1, 0, torch.randn(20, 576)), (2, 0, torch.randn(20, 576))])
    gpus.fail(*(RuntimeError(DEVICE_LOST) for _ in range(4)), device=1)  # xpu:1 is lost at the next step
    for position in range(20, 24):
        step([(1, position, torch.randn(1, 576)), (2, position, torch.randn(1, 576))])
    assert [p.name for p in engine.parts] == ["ipex", "cpu"]
    assert inputs is not None, "xpu:0 may still lose its part: the inputs are kept"
    gpus.fail(*(RuntimeError(DEVICE_LOST) for _ in range(4)), device=0)
    step([(1, 24, torch.randn(1, 576)), (2, 24, torch.randn(1, 576))])
    assert engine.name == "cpu" and inputs is None, "wholly on the CPU: nothing more to keep"
    reason = engine.fallback_reason or ""
    assert reason.startswith("layers 15-21 on xpu:0") and "; layers 22-29 on xpu:1 (" in reason
