"""Int4 on an Intel GPU through PyTorch's XPU kernel: the fake GPU's int4 ops check the layout they are given and
compute what the XPU kernel computes; without them the linears keep dequantising in the matmul."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.quant import GroupQuantized, Int4Linear, Int8Linear, dequantizing_in_matmul
from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.ipex.device import XpuDevice
from ringlet.worker.engines.ipex.int4_xpu import XpuInt4Linear, has_int4_kernel, use_int4_kernel
from ringlet.worker.engines.ipex.utils_ipex import load_ipex_engine
from tests.support.xpu import FakeXpu, fake_runtime, int4_kernel_on_fake_xpu


def a_stage_of_int4_linears(groups: GroupQuantized, bias: torch.Tensor | None) -> nn.Module:
    stage = nn.Sequential(nn.Sequential(Int4Linear(groups, bias, torch.bfloat16)),
                          Int8Linear(torch.randn(8, groups.codes.shape[0]), None, torch.bfloat16))
    dequantizing_in_matmul(stage)  # as the ipex engine leaves a stage it moves to its GPU
    return stage


def test_int4_linears_run_the_xpu_kernel_on_their_groups() -> None:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 128), torch.randn(96), torch.randn(3, 5, 128).bfloat16()
    groups = GroupQuantized.round(weight)
    stage = a_stage_of_int4_linears(groups, bias)
    with int4_kernel_on_fake_xpu() as kernel:
        assert has_int4_kernel(torch.device("cpu"))
        assert use_int4_kernel(stage, torch.bfloat16) == 1
        linear = stage[0][0]
        assert isinstance(linear, XpuInt4Linear) and isinstance(stage[1], Int8Linear)  # int8 stays as it was
        y = linear(x)
    assert not has_int4_kernel(torch.device("cpu"))  # the fake ops are gone with the block
    [(pack, packed_args, tiles), (mm, mm_args, group)] = kernel.calls
    assert (pack, packed_args, tiles) == ("_convert_weight_to_int4pack", [((96, 64), torch.uint8)], 8)
    assert (mm, group) == ("_weight_int4pack_mm", 32)
    assert mm_args == [((15, 128), torch.bfloat16), ((96, 16), torch.int32), ((4, 96, 2), torch.bfloat16)]
    assert linear.weight.shape == (96, 16) and linear.weight.dtype == torch.int32  # half a byte a weight
    assert y.shape == (3, 5, 96) and y.dtype == torch.bfloat16
    reference = F.linear(x.float(), groups.dequantize(), bias)
    assert (y.float() - reference).abs().max() < 0.01 * reference.abs().max()  # bf16 scales and activations


def test_without_the_kernel_the_linears_keep_dequantising_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    stage = a_stage_of_int4_linears(GroupQuantized.round(torch.randn(32, 64)), None)
    with caplog.at_level(logging.INFO, logger="ringlet.worker.engines.ipex.int4_xpu"):
        assert use_int4_kernel(stage, torch.bfloat16) == 0
    assert isinstance(stage[0][0], Int4Linear) and stage[0][0].dequantize_in_matmul
    [line] = [r.getMessage() for r in caplog.records]
    assert "no int4 kernel for cpu" in line and "dequantise their weights in every matmul" in line


@pytest.mark.slow
def test_an_int4_engine_on_the_fake_gpu_runs_its_linears_on_the_kernel() -> None:
    with int4_kernel_on_fake_xpu() as kernel:
        engine = load_ipex_engine(None, device=XpuDevice(fake_runtime(FakeXpu())),
                                  config=EngineConfig(precision="int4", kv_cache_tokens=1024), optimization="eager")
        on_kernel = [m for m in engine.model.modules() if isinstance(m, XpuInt4Linear)]
        assert on_kernel and not any(isinstance(m, Int4Linear) for m in engine.model.modules())
        assert f"{len(on_kernel)} int4 linears on PyTorch's XPU int4 kernel" in engine.optimization
        packs = sum(1 for op, *_ in kernel.calls if op == "_convert_weight_to_int4pack")
        assert packs == len(on_kernel)
