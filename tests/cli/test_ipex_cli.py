"""`ringlet run` and `ringlet bench` with the ipex engines: IPEX's CPU backend where IPEX is missing, an Intel GPU
without room, the optimisation flag, and bench's device memory on a fake Intel GPU."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringlet.cli import main
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance
from ringlet.worker.engines.ipex.device import XpuDevice
from ringlet.worker.engines.ipex.utils_ipex import check_fits, load_ipex_engine
from tests.support.xpu import FakeXpu, GiB, fake_runtime


class MeasuringXpu(FakeXpu):
    """A fake Intel GPU whose allocator reports a peak, as torch.xpu.max_memory_allocated does."""

    def max_memory_allocated(self, device: int) -> int:
        return 3 * GiB // 2 + device


def test_ipex_cpu_without_ipex_is_one_line_with_the_fix(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["run", "hi", "--engine", "ipex-cpu"]) == 2
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
    assert main(["run", "hi", "--engine", "ipex", "--ipex-optimization-level", "compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringlet: error: engine ipex: model.gguf (bf16) needs about 3.00 GiB on xpu:0 (Intel(R) "
                          "Arc(TM) A770 Graphics) but only 0.50 GiB is free: use a smaller model or precision")
    assert "Traceback" not in err
    assert asked[0].instance.ipex_optimization_level == "compile"


@pytest.mark.slow
def test_bench_on_an_intel_gpu_reports_the_device_and_its_memory(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    asked: list[tuple[str | None, str]] = []

    def load_engine(model: str | None, engine: str | None, config: EngineConfig, optimization: str) -> Any:
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
