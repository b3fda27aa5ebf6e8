"""Where each tensor-parallel rank runs and over which torch.distributed backends (`worker/tensor_ranks.py`): CUDA
rank r on GPU r, an IpexRing's ranks on the Intel GPUs placement counted for them (over xccl, refused with the fix
where this torch lacks it), CPU ranks over gloo. The ranks themselves run in tests/node/test_tensor_parallel_live.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ringlet.shared.instances import BoundInstance, Instance, InstanceType, Shard, rank_intel_gpus
from ringlet.worker.tensor_ranks import group_backend, rank_device

ENGINES = {InstanceType.CUDA_RING: "cuda", InstanceType.IPEX_RING: "ipex", InstanceType.CPU_RING: "cpu"}


def bound(instance_type: InstanceType, degree: int, intel_gpu_devices: tuple[int, ...] | None = None
          ) -> BoundInstance:
    shard = Shard(node_id="a", rank=0, start=0, end=30, num_layers=30, engine=ENGINES[instance_type])
    instance = Instance(instance_id="i", model="m", instance_type=instance_type, shards=[shard],
                        tensor_parallel=degree, intel_gpu_devices=intel_gpu_devices)
    return BoundInstance(instance=instance, node_id="a")


def test_each_rank_runs_on_the_device_placement_counted_for_it() -> None:
    cuda = bound(InstanceType.CUDA_RING, 4)
    assert [rank_device(cuda, r) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    assert [rank_device(bound(InstanceType.IPEX_RING, 2), r) for r in range(2)] == [torch.device("xpu", 0),
                                                                                    torch.device("xpu", 1)]
    named = bound(InstanceType.IPEX_RING, 2, intel_gpu_devices=(3, 1, 0))
    assert [rank_device(named, r) for r in range(2)] == [torch.device("xpu", 3), torch.device("xpu", 1)]
    assert rank_intel_gpus((3, 1, 0), 2) == (3, 1)  # the rule placement counts memory by
    assert rank_device(bound(InstanceType.CPU_RING, 3), 2) == torch.device("cpu")


def test_the_backends_of_each_engines_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert group_backend("cpu") == "gloo"
    monkeypatch.setattr(dist, "is_xccl_available", lambda: True, raising=False)
    assert group_backend("ipex") == "cpu:gloo,xpu:xccl"
    monkeypatch.setattr(dist, "is_xccl_available", lambda: False, raising=False)
    with pytest.raises(RuntimeError, match="needs torch.distributed's xccl backend.*XPU build of torch 2.8"):
        group_backend("ipex")
