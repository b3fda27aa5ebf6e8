"""`ringlet run` and `ringlet bench` with the ipex engines: IPEX's CPU backend where IPEX is missing, an Intel GPU
without room, the optimisation flag, and bench's device memory on a fake Intel GPU."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringlet.cli import main
from ringlet.shared.config import EngineConfig
from ringlet.shared.engine_info import GpuInfo
from ringlet.shared.instances import BoundInstance, DeviceLayers, Instance, Shard
from ringlet.worker.engines.ipex.device import XpuDevice
from ringlet.worker.engines.ipex.utils_ipex import check_fits, initialize_ipex, load_ipex_engine
from tests.support.node_infos import node_info
from tests.support.xpu import INTEL_ARC_ON_BUS, FakeXpu, GiB, fake_runtime, probes


class MeasuringXpu(FakeXpu):
    """A fake Intel GPU whose allocator reports a peak, as torch.xpu.max_memory_allocated does."""

    def max_memory_allocated(self, device: int) -> int:
        return 3 * GiB // 2 + device


def test_ipex_cpu_without_ipex_is_one_line_with_the_fix(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["run", "Say hi", "--engine", "ipex-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringlet: error: engine ipex-cpu: IPEX is required but intel-extension-for-pytorch is "
                          "not installed; fix: pip install 'ringlet[ipex]'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_intel_gpu_without_room_is_a_message_with_the_fix(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    asked: list[BoundInstance] = []

    def initialize_engine(bound: BoundInstance, config: EngineConfig) -> Any:
        asked.append(bound)
        check_fits(XpuDevice(fake_runtime(FakeXpu(total=8 * GiB, free=GiB // 2))), 3 * GiB, "model.gguf (bf16)")

    monkeypatch.setattr("ringlet.worker.engines.engine_utils.select_best_engine", lambda engine: "ipex")
    monkeypatch.setattr("ringlet.worker.engines.engine_init.initialize_engine", initialize_engine)
    assert main(["run", "Say hi", "--engine", "ipex", "--ipex-optimization-level", "compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringlet: error: engine ipex: model.gguf (bf16) needs about 3.00 GiB on xpu:0 (Intel(R) "
                          "Arc(TM) A770 Graphics) but only 0.50 GiB is free: use a smaller model or precision")
    assert "Traceback" not in err
    assert asked[0].instance.ipex_optimization_level == "compile"


@pytest.mark.slow
def test_bench_on_an_intel_gpu_reports_the_device_and_its_memory(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    asked: list[tuple[str | None, str]] = []

    def load_engine(model: str | None, engine: str | None, config: EngineConfig, optimization: str,
                    devices: str | None) -> Any:
        assert devices is None
        asked.append((engine, optimization))
        return load_ipex_engine(model, XpuDevice(fake_runtime(MeasuringXpu())), config.model_copy(
            update={"precision": "fp32", "kv_cache_tokens": 512}), optimization="eager")

    monkeypatch.setattr("ringlet.cli.bench.load_engine", load_engine)
    assert main(["bench", "--engine", "ipex", "--ipex-optimization-level", "eager", "--prompt-tokens", "8",
                 "--new-tokens", "4", "--repeats", "1", "--streams", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert asked == [("ipex", "eager")]
    assert results["engine"] == "ipex" and results["device"] == "xpu:0 (Intel(R) Arc(TM) A770 Graphics)"
    assert results["optimization"] == "eager (native torch.xpu, no IPEX, not compiled)"
    assert results["ringlet"]["peak_memory_mb"] == 1536  # the device's peak, not the host's
    assert results["ringlet"]["new_tokens"] == 4 and results["streams"][0]["new_tokens"] == 8


def two_small_arcs(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """This machine, as `ringlet run` detects it, has two Intel GPUs with 0.35 GiB free each: less than the embedded
    model needs with its 8192-token cache in bf16 (about 0.43 GiB), more than half of it."""
    gpus = tuple(GpuInfo(vendor="intel", index=i, name="Intel(R) Arc(TM) A310", memory_total_bytes=4 * GiB,
                         memory_free_bytes=int(0.35 * GiB), integrated=False) for i in (0, 1))
    node = node_info("local", 32, engines=("ipex", "cpu"), gpus=gpus)
    monkeypatch.setattr("ringlet.worker.system_info.collect_node_hardware", lambda: node.hardware)
    monkeypatch.setattr("ringlet.worker.system_info.collect_engine_info", lambda engine: node.engines)
    monkeypatch.setattr("ringlet.worker.engines.engine_utils.select_best_engine", lambda engine: "ipex")


def test_run_splits_a_model_over_the_intel_gpus_it_is_given_as_a_node_would(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    two_small_arcs(monkeypatch)
    asked: list[BoundInstance] = []

    def initialize_engine(bound: BoundInstance, config: EngineConfig) -> Any:
        asked.append(bound)
        raise ValueError("stop here")

    monkeypatch.setattr("ringlet.worker.engines.engine_init.initialize_engine", initialize_engine)
    assert main(["run", "Say hi", "--engine", "ipex", "--intel-gpu-devices", "0,1"]) == 2
    (bound,) = asked
    assert [(d.device, d.start, d.end) for d in bound.shard.devices] == [(0, 0, 15), (1, 15, 30)]
    assert bound.instance.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and bound.engine == "ipex"
    assert bound.instance.intel_gpu_devices == (0, 1)
    assert main(["run", "Say hi", "--engine", "ipex", "--intel-gpu-devices", "1"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("ringlet: error: SmolLM2-135M-Instruct needs 0.4 GiB on Intel GPUs") and len(asked) == 1
    assert "this machine: 1 (Intel(R) Arc(TM) A310, discrete, 0.3 GiB free)" in err


def test_intel_gpu_devices_are_for_the_ipex_engine(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("ringlet.worker.engines.engine_utils.select_best_engine", lambda engine: "cpu")
    assert main(["run", "Say hi", "--engine", "cpu", "--intel-gpu-devices", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("ringlet: error: --intel-gpu-devices is for the ipex engine, not cpu; "
                                               "add --engine ipex")


@pytest.mark.slow
def test_bench_of_a_model_split_over_two_gpus_reports_both(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    two_gpus = MeasuringXpu(count=2)

    def load_engine(model: str | None, engine: str | None, config: EngineConfig, optimization: str,
                    devices: str | None) -> Any:
        assert (engine, devices) == ("ipex", "0,1")
        shard = Shard(node_id="local", rank=0, start=0, end=30, num_layers=30, engine="ipex",
                      devices=(DeviceLayers(device=0, start=0, end=12), DeviceLayers(device=1, start=12, end=30)))
        bound = BoundInstance(instance=Instance(instance_id="local", model="default", instance_type="IpexRing",
                                                shards=[shard], ipex_optimization_level="eager"), node_id="local")
        return initialize_ipex(bound, config.model_copy(update={"precision": "fp32", "kv_cache_tokens": 512}),
                               probes=probes(tmp_path, two_gpus, INTEL_ARC_ON_BUS))

    monkeypatch.setattr("ringlet.cli.bench.load_engine", load_engine)
    assert main(["bench", "--engine", "ipex", "--intel-gpu-devices", "0,1", "--prompt-tokens", "8",
                 "--new-tokens", "4", "--repeats", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["device"] == "xpu:0 (Intel(R) Arc(TM) A770 Graphics), xpu:1 (Intel(R) Arc(TM) A770 Graphics)"
    assert results["ringlet"]["peak_memory_mb_per_device"] == [1536, 1536 + 1 / 2**20]
    assert results["ringlet"]["peak_memory_mb"] == 3072 + 1 / 2**20  # both devices' peaks
