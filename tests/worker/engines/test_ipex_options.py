"""The ipex engine's options on a fake Intel GPU: the optimisation level (and torch.compile's way back to eager at
warm-up), the choice of GPU from the instance's `intel_gpu_devices`, and weight-only int8/int4 dequantised in the
matmul."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ringlet.models.quant import GroupQuantized, Int4Linear, Int8Linear, dequantizing_in_matmul
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, Instance, IpexOptimizationLevel, Shard
from ringlet.worker.engines.ipex import IPEXEngineError, IPEXMemoryError
from ringlet.worker.engines.ipex.device import XpuDevice
from ringlet.worker.engines.ipex.utils_ipex import choose_xpu, initialize_ipex, load_ipex_engine
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from tests.support.greedy import (
    assert_parting_is_a_near_tie,
    compare_with_reference,
    greedy_task,
    greedy_with_logits,
    run_greedy,
)
from tests.support.xpu import (
    ARC_A770,
    CORE_ULTRA_IGPU,
    INTEL_ARC_ON_BUS,
    FakeDevice,
    FakeXpu,
    GiB,
    fake_runtime,
    probes,
)

SETTINGS = EngineConfig(precision="fp32", kv_cache_tokens=1024)
COMPILE_LOGGER = "ringlet.worker.engines.ipex.compiled"
NEAR_TIE = 0.25  # two bf16 steps of a logit near 27: kernels that round differently may part there
NO_COMPILER = "InductorError: RuntimeError: Cannot find a working triton installation for XPU"


def fake_gpu_engine(optimization: IpexOptimizationLevel, config: EngineConfig = SETTINGS) -> Any:
    return load_ipex_engine(None, device=XpuDevice(fake_runtime(FakeXpu())), config=config, optimization=optimization)


def compile_that_fails_when_called(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch.compile as a compiler that builds nothing until the first call, which fails (as Triton's XPU backend
    does without a SYCL compiler); returns the list of calls."""
    calls: list[int] = []

    def compile(fn: Callable[..., Any], **_: Any) -> Callable[..., Any]:
        def compiled(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            raise RuntimeError(f"{NO_COMPILER}\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
        return compiled

    monkeypatch.setattr(torch, "compile", compile)
    return calls


@pytest.mark.slow
def test_a_compile_that_fails_at_warm_up_leaves_the_model_eager(monkeypatch, caplog, cpu_reference) -> None:  # type: ignore[no-untyped-def]
    calls = compile_that_fails_when_called(monkeypatch)
    engine = fake_gpu_engine("compile")
    layers = engine.loaded.stage.args.num_hidden_layers
    assert engine.optimization == f"torch.compile of {3 * layers + 1} MLP and norm layers (native torch.xpu, IPEX not asked for)"
    with caplog.at_level(logging.WARNING):
        engine.warmup()
    assert calls == [1]  # the first compiled call failed, and none was tried after it
    assert engine.optimization == f"eager (torch.compile failed at warm-up: RuntimeError: {NO_COMPILER})"
    assert engine.name == "ipex" and engine.fallback_reason is None
    assert not [m for m in engine.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    [line] = [r.getMessage() for r in caplog.records if r.name == COMPILE_LOGGER]
    assert "torch.compile failed at warm-up" in line and NO_COMPILER in line and line.endswith("running eagerly")
    assert run_greedy(engine, greedy_task()) == cpu_reference  # eager fp32: the CPU engine's tokens


@pytest.mark.slow
def test_eager_applies_nothing_and_auto_compiles_without_ipex(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    eager = fake_gpu_engine("eager")
    assert eager.optimization == "eager (native torch.xpu, no IPEX, not compiled)"
    assert not [m for m in eager.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    compiled: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **_: compiled.append(type(fn.__self__).__name__) or fn)
    auto = fake_gpu_engine("auto")
    assert auto.optimization.startswith("torch.compile of") and auto.optimization.endswith("(native torch.xpu, no IPEX)")
    assert set(compiled) == {"MLP", "RMSNorm"}


def test_level_ipex_without_ipex_is_an_error_before_any_weight_is_read() -> None:
    with pytest.raises(IPEXEngineError, match="IPEX is required but intel-extension-for-pytorch is not installed"):
        fake_gpu_engine("ipex")
    with pytest.raises(IPEXEngineError, match="int8 on an Intel GPU runs ringlet's quantised linears.*compile or eager"):
        fake_gpu_engine("ipex", EngineConfig(precision="int8"))
    with pytest.raises(IPEXEngineError, match="runs on the CPU only through IPEX, not eager"):
        load_ipex_engine(None, device="cpu", optimization="eager")


def instance(devices: tuple[int, ...] | None, level: IpexOptimizationLevel = "eager") -> BoundInstance:
    shard = Shard(node_id="n1", rank=0, start=0, end=30, num_layers=30, engine="ipex")
    return BoundInstance(instance=Instance(instance_id="i1", model="default", instance_type="IpexRing", shards=[shard],
                                           intel_gpu_devices=devices, ipex_optimization_level=level), node_id="n1")


def two_gpus(tmp_path, igpu_free: int | None = None, arc_free: int | None = None):  # type: ignore[no-untyped-def]
    gpu = FakeXpu(devices=[FakeDevice(CORE_ULTRA_IGPU, 8 * GiB, igpu_free), FakeDevice(ARC_A770, 16 * GiB, arc_free)])
    return probes(tmp_path, gpu, INTEL_ARC_ON_BUS)


@pytest.mark.slow
def test_an_instance_runs_on_the_discrete_gpu_unless_it_names_its_devices(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = initialize_ipex(instance(None), SETTINGS, probes=two_gpus(tmp_path))
    assert engine.compute.index == 1 and engine.optimization.startswith("eager")
    engine = initialize_ipex(instance((0,)), SETTINGS, probes=two_gpus(tmp_path / "b"))
    assert engine.compute.index == 0 and engine.name == "ipex"


def test_the_first_chosen_gpu_with_room_is_taken_and_none_with_room_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tight = two_gpus(tmp_path, igpu_free=GiB // 10, arc_free=2 * GiB)
    assert choose_xpu((0, 1), GiB, "model", tight).index == 1
    assert choose_xpu(None, GiB, "model", tight).index == 1
    with pytest.raises(IPEXMemoryError) as caught:
        choose_xpu((0, 1), 3 * GiB, "model (bf16)", tight)
    message = str(caught.value)
    assert "none of the 2 chosen has it free" in message and "placement splits it over the GPUs" in message
    assert "xpu:0 (Intel(R) Arc(TM) Graphics): 0.10 GiB" in message and caught.value.free_bytes == 2 * GiB
    with pytest.raises(IPEXMemoryError, match="only 2.00 GiB is free"):
        choose_xpu((1,), 3 * GiB, "model (bf16)", tight)


@pytest.mark.usefixtures("pytorch_cpu_kernels")  # PyTorch's int8 kernel, exact in fp32 (x unrounded)
def test_int8_dequantised_in_the_matmul_matches_the_dequantised_weight() -> None:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    layer = Int8Linear(weight, bias, torch.float32)
    reference = F.linear(x, layer.weight.float() * layer.scales[:, None], bias)
    packed = layer(x)  # the CPU kernel
    assert dequantizing_in_matmul(layer) == 1 and layer.dequantize_in_matmul
    assert torch.allclose(layer(x), reference, atol=1e-5) and torch.allclose(packed, reference, atol=1e-4)
    exact = F.linear(x, weight, bias)  # and int8 stays within 1% of the weight itself
    assert (layer(x) - exact).abs().max() < 0.01 * exact.abs().max()


def test_int4_dequantised_in_the_matmul_matches_the_dequantised_groups() -> None:
    torch.manual_seed(0)
    weight, x = torch.randn(64, 128), torch.randn(2, 128).bfloat16()
    groups = GroupQuantized.round(weight)
    layer = Int4Linear(groups, None, torch.bfloat16)
    assert dequantizing_in_matmul(layer) == 1 and layer.weight.numel() == 0  # the CPU-packed codes are gone
    reference = F.linear(x.float(), groups.dequantize())
    assert (layer(x).float() - reference).abs().max() < 0.01 * reference.abs().max()  # bf16's rounding


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_precisions_run_on_an_intel_gpu(precision: str) -> None:
    engine = fake_gpu_engine("eager", EngineConfig(precision=precision, kv_cache_tokens=1024))  # type: ignore[arg-type]
    assert engine.precision == precision and f"{precision} weight-only linears dequantised in the matmul" in engine.optimization
    quantised = [m for m in engine.model.modules() if isinstance(m, Int8Linear | Int4Linear)]
    assert quantised and all(m.dequantize_in_matmul for m in quantised)
    # the CPU engine at the same precision, on its packed kernels: the same weights, so the same greedy tokens up to
    # a near tie (bf16 logits: two candidates of the embedded model's first token meet at 26.75 on an AMX Xeon),
    # where the two kernels' roundings may pick differently
    cpu = TorchBatchEngine.load(None, config=EngineConfig(precision=precision, kv_cache_tokens=1024, cpu_compile=False))  # type: ignore[arg-type]
    reference, logits = greedy_with_logits(cpu, task := greedy_task(tokens=8))
    assert_parting_is_a_near_tie(compare_with_reference(engine, reference, logits, task), NEAR_TIE)
