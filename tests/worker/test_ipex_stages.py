"""A split model's stages on a fake Intel GPU, driven in-process without a ring: the stage's own memory check,
optimisation level, guarded steps, and the CPU fallback that rebuilds the stage's cache and goes on; and the
ring's choice of collective backend."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ringlet.models.paged_cache import SequenceStep
from ringlet.net.xccl import ring_backend
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, Instance, Shard
from ringlet.worker.engines.ipex import IPEXMemoryError
from ringlet.worker.engines.ipex.engine import IpexEngine
from ringlet.worker.engines.ipex.stage import IpexStage
from ringlet.worker.engines.ipex.utils_ipex import load_ipex_layers
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.engine import load_torch_stage
from ringlet.worker.pipeline import StageInputs, _forward
from ringlet.worker.stages import TorchStage, load_for_stage
from tests.support.xpu import INTEL_ARC_ON_BUS, FakeXpu, GiB, probes

SETTINGS = EngineConfig(precision="fp32", kv_cache_tokens=512)
DEVICE_LOST = "Native API failed. Native API returns: -36 (UR_RESULT_ERROR_DEVICE_LOST)"
GUARD_LOGGER = "ringlet.worker.engines.ipex.generator.generate"
SPLIT = 15  # the embedded model's 30 layers, halved


def ring_of_two(node: str, optimization: str = "eager") -> BoundInstance:
    shards = [Shard(node_id="n1", rank=0, start=0, end=SPLIT, num_layers=30, engine="ipex"),
              Shard(node_id="n2", rank=1, start=SPLIT, end=30, num_layers=30, engine="ipex")]
    return BoundInstance(instance=Instance(instance_id="ring", model="default", instance_type="IpexRing",
                                           shards=shards, ipex_optimization_level=optimization), node_id=node)


def greedy_through(first, last, prompt: list[int], tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids, start, out = torch.tensor([prompt]), 0, []
    for _ in range(tokens):
        logits = last.forward(first.forward(ids, start), start)
        start += ids.shape[1]
        out.append(int(logits.argmax(-1)))
        ids = torch.tensor([[out[-1]]])
    return out


@pytest.mark.slow
def test_a_stage_that_loses_its_gpu_rebuilds_its_cache_on_the_cpu_and_goes_on(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    first_gpu, last_gpu = FakeXpu(), FakeXpu()
    first, _ = load_for_stage(ring_of_two("n1"), SETTINGS, probes(tmp_path / "a", first_gpu, INTEL_ARC_ON_BUS))
    last, precision = load_for_stage(ring_of_two("n2"), SETTINGS, probes(tmp_path / "b", last_gpu, INTEL_ARC_ON_BUS))
    assert isinstance(first, IpexStage) and isinstance(last, IpexStage) and precision == "fp32"
    assert (last.name, last.optimization, last.fallback_reason) == (
        "ipex", "eager (native torch.xpu, no IPEX, not compiled)", None)
    cpu = torch.device("cpu")
    reference = greedy_through(TorchStage(load_torch_stage(None, 0, SPLIT, "fp32", cpu)[0], cpu),
                               TorchStage(load_torch_stage(None, SPLIT, 30, "fp32", cpu)[0], cpu),
                               prompt := first.tokenizer.encode("The capital of France is"), 12)
    last_gpu.fail(*(RuntimeError(DEVICE_LOST) for _ in range(4)), after=5)  # the 6th step keeps failing
    with caplog.at_level(logging.WARNING):
        assert greedy_through(first, last, prompt, 12) == reference
    [line] = [r.getMessage() for r in caplog.records if r.name == GUARD_LOGGER]
    assert "failed 4 times in a row" in line and "this stage of the ring now runs on the CPU engine" in line
    assert last.name == "cpu" and last.fallback_reason and "UR_RESULT_ERROR_DEVICE_LOST" in last.fallback_reason
    assert last.optimization == "none (the cpu engine, after the device failed)"
    assert first.name == "ipex" and first.fallback_reason is None
    assert greedy_through(first, last, prompt, 4) == reference[:4]  # later requests too, on the CPU


def test_a_stage_is_checked_for_its_own_layers_memory(tmp_path: Path) -> None:
    # room for half the embedded model's layers in fp32 at its 8192 positions (estimate_bytes: 673 MiB), not for all
    # of them (1074 MiB)
    half = probes(tmp_path, FakeXpu(total=GiB, free=800 * 2**20), INTEL_ARC_ON_BUS)
    whole = ring_of_two("n1").model_copy(update={"instance": ring_of_two("n1").instance.model_copy(update={
        "shards": [Shard(node_id="n1", rank=0, start=0, end=30, num_layers=30, engine="ipex")]})})
    with pytest.raises(IPEXMemoryError, match=r"needs about .* GiB on xpu:0 .* but only 0.78 GiB is free"):
        load_ipex_layers(whole, SETTINGS, half)
    loaded, compute = load_ipex_layers(ring_of_two("n2"), SETTINGS, half)
    assert (loaded.stage.start, loaded.stage.end) == (SPLIT, 30) and compute.index == 0


@pytest.mark.slow
def test_a_batched_stage_rebuilds_every_live_sequence_after_a_fallback(tmp_path: Path) -> None:
    gpu = FakeXpu()
    loaded, compute = load_ipex_layers(ring_of_two("n2"), SETTINGS, probes(tmp_path, gpu, INTEL_ARC_ON_BUS))
    engine = IpexEngine(loaded, compute, None, SETTINGS, max_retries=1, num_blocks=8)
    reference = TorchBatchEngine(load_torch_stage(None, SPLIT, 30, "fp32", torch.device("cpu"))[0],
                                 torch.device("cpu"), SETTINGS, num_blocks=8)
    torch.manual_seed(0)
    inputs = StageInputs(engine)
    blocks = {1: [0, 1], 2: [2, 3]}
    prompts = {key: torch.randn(20, 576) for key in blocks}

    def step(key_starts: list[tuple[int, int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal inputs
        steps = [SequenceStep(start, len(x), blocks[key]) for key, start, x in key_starts]
        x = torch.cat([x for _, _, x in key_starts])
        out, kept = _forward(engine, inputs, x, steps, [key for key, _, _ in key_starts])
        if kept is not None:
            inputs = kept
        return out, reference.forward_batch(x, steps)

    out, expected = step([(1, 0, prompts[1]), (2, 0, prompts[2])])
    assert torch.allclose(out, expected, atol=1e-4) and set(inputs.given) == {1, 2}
    gpu.fail(RuntimeError(DEVICE_LOST), RuntimeError(DEVICE_LOST))  # the next step falls back (one retry)
    for position in range(20, 24):
        out, expected = step([(1, position, torch.randn(1, 576)), (2, position, torch.randn(1, 576))])
        assert torch.allclose(out, expected, atol=1e-4)  # the CPU's cache holds what the device's held
    assert engine.name == "cpu" and engine.fallback_reason and "failed 2 times" in engine.fallback_reason


def test_xccl_that_fails_to_start_leaves_the_ring_on_gloo(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(dist, "is_xccl_available", lambda: True)

    def init_process_group(backend: str, **_: object) -> None:
        assert backend == "xccl"
        raise RuntimeError("oneCCL: atl_ofi.cpp:1054 open_providers: EXCEPTION: failed to find a provider\nmore")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with caplog.at_level(logging.INFO):
        assert ring_backend(dist.HashStore(), 0, 1, torch.device("cpu"), "instance ring") == "gloo"
    [line] = [r.getMessage() for r in caplog.records if r.name == "ringlet.net.xccl"]
    assert line == ("instance ring: xccl is not usable on this ring (stage 0: xccl failed to start (RuntimeError: "
                    "oneCCL: atl_ofi.cpp:1054 open_providers: EXCEPTION: failed to find a provider)); using gloo "
                    "with host tensors")


def test_xccl_is_used_where_every_stage_ran_its_all_reduce(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []
    monkeypatch.setattr(dist, "is_xccl_available", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **_: calls.append(f"init {backend}"))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: calls.append(f"all_reduce {tensor.tolist()}"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    store = dist.HashStore()
    with caplog.at_level(logging.INFO):
        assert ring_backend(store, 0, 1, torch.device("cpu"), "instance ring") == "xccl"
    assert calls == ["init xccl", "all_reduce [1.0]", "destroy"]  # the probe's group is gone before the ring's
    monkeypatch.setattr(dist, "is_xccl_available", lambda: False)
    with caplog.at_level(logging.INFO):
        assert ring_backend(dist.HashStore(), 0, 1, torch.device("cpu"), "instance ring") == "gloo"
    assert "stage 0: this PyTorch has no xccl backend" in caplog.records[-1].getMessage()


def test_an_ipex_ring_whose_xccl_fails_joins_over_gloo_with_host_frames(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ringlet.net.ring import Ring, host_store
    from ringlet.shared.instances import InstanceType

    monkeypatch.setattr(dist, "is_xccl_available", lambda: True)

    def init_process_group(backend: str, **_: object) -> None:
        raise RuntimeError(f"{backend}: no Level Zero device")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    instance = Instance(instance_id="ring-1", model="m", instance_type=InstanceType.IPEX_RING,
                        shards=[Shard(node_id="a", rank=0, start=0, end=30, num_layers=30, engine="ipex")])
    store, _ = host_store("127.0.0.1", 1)
    ring = Ring(BoundInstance(instance=instance, node_id="a"), store, "127.0.0.1", hidden_size=8,
                device=torch.device("cpu"))
    assert ring.backend == "gloo" and ring.device == torch.device("cpu")
