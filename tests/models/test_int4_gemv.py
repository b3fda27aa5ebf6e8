"""The one-row int4 and int8 products (`int4_gemv_dp4a_kernel`, `int8_gemv_dp4a_kernel`: a CUDA decode step's
projections), their few-row forms (a batch's decode step) and the prompt chunks' dense path, run by Triton's
interpreter on CPU tensors against the dequantised weight in fp32 times x rounded as the kernels round it, with each
option the fused decode steps use. On a GPU, tests/worker/gpu/test_int4_cuda.py runs them compiled."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from ringlet.models.kernels import int4_cuda
from ringlet.models.quant_cuda import CudaInt4Linear
from ringlet.models.quant_format import GroupQuantized

pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; scripts/test.sh installs it for these tests")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="a GPU machine: tests/worker/gpu runs this kernel compiled")


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 with its absmax scale, as the dp4a kernel rounds it, back in fp32."""
    blocks = x.view(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.floor(blocks / scale.clamp_min(1e-30) + 0.5) * scale).view(x.shape)


def expected(x, weight, norm, bias, gated, residual, int8_x=False):  # type: ignore[no-untyped-def]
    xf = x.float()
    if norm is not None:
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
        xf = xf * norm.float()
        xf = (int8_blocks(xf) if int8_x else xf) * rstd
    elif int8_x:
        xf = int8_blocks(xf)
    y = xf @ weight.t() + (0 if bias is None else bias.float())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y + (0 if residual is None else residual.float())


@pytest.mark.parametrize(("n", "k", "group", "words"), [
    (40, 512, 128, None),  # the default tiling: 64 words a step, blocks of rows, the last one partly masked
    (24, 768, 128, 32),  # K of 96 words: 3 steps of 2 groups
    (16, 256, 32, 8),  # GGUF's groups of 32: 2 groups a step
])
@pytest.mark.parametrize("options", ["plain", "norm", "gated+norm", "bias+residual"])
@pytest.mark.parametrize("ahead", [False, True], ids=["in-step", "step-ahead"])
def test_one_row_matches_the_dequantised_weight(n, k, group, words, options, ahead):
    torch.manual_seed(n + k)
    rows = 2 * n if "gated" in options else n
    layer = CudaInt4Linear(GroupQuantized.round(torch.randn(rows, k) * 0.02, group), None, torch.bfloat16)
    if "bias" in options:
        layer.bias = torch.randn(rows).to(torch.bfloat16)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    norm = (1 + 0.1 * torch.randn(k)).to(torch.bfloat16) if "norm" in options else None
    start = torch.randn(1, n, dtype=torch.bfloat16)
    out = start.clone()
    tiling = (dataclasses.replace(int4_cuda.gemv_tiling(n, k, group, "gated" in options), ahead=ahead) if words is None
              else int4_cuda.GemvTiling(8, words, ahead=ahead))
    int4_cuda._int4_gemv_rows(x, layer.packed, layer.scale, layer.offset, group, out, n, k, layer.bias, norm, 1e-5,
                              "gated" in options, "residual" in options, False, tiling)
    reference = expected(x, layer.dequantize(), norm, layer.bias, "gated" in options,
                         start if "residual" in options else None, int8_x=True)
    # bf16 output: its rounding (and, gated, the SiLU's input rounded as the eager path rounds it)
    torch.testing.assert_close(out.float(), reference, atol=2e-3, rtol=2e-2)


def test_the_default_tiling_steps_over_whole_groups():
    for n, k, group in [(4096, 4096, 128), (4096, 14336, 128), (28672, 4096, 128), (1001, 768, 32), (64, 96, 32)]:
        t = int4_cuda.gemv_tiling(n, k, group)
        assert (k // 8) % t.words == 0 and (8 * t.words) % group == 0, (n, k, group, t)


@pytest.mark.parametrize(("n", "k"), [(40, 512), (24, 96)])
@pytest.mark.parametrize("options", ["plain", "norm", "gated+norm", "bias+residual"])
def test_one_row_int8_matches_the_dequantised_weight(n, k, options):
    from ringlet.models.quant_cuda import CudaInt8Linear

    torch.manual_seed(n + k)
    rows = 2 * n if "gated" in options else n
    layer = CudaInt8Linear(torch.randn(rows, k) * 0.02, torch.randn(rows) if "bias" in options else None,
                           torch.bfloat16)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    norm = (1 + 0.1 * torch.randn(k)).to(torch.bfloat16) if "norm" in options else None
    start = torch.randn(1, n, dtype=torch.bfloat16)
    out = start.clone()
    int4_cuda._int8_gemv_rows(x, layer.weight, layer.scale, out, n, k, layer.bias, norm, 1e-5, "gated" in options,
                              "residual" in options, False, block_n=16)
    reference = expected(x, layer.dequantize(), norm, layer.bias, "gated" in options,
                         start if "residual" in options else None, int8_x=True)
    # the product plus a bias of about 1 is rounded to bf16 before the residual adds (up to 2^-8 of it)
    torch.testing.assert_close(out.float(), reference, atol=1e-2 if "bias" in options else 2e-3, rtol=2e-2)


@pytest.mark.parametrize(("m", "n", "k", "group"), [
    (2, 40, 512, 128),  # 128 words a step do not divide K's 64 -> 32
    (3, 24, 768, 128),  # 4 rows a program, one masked: 64 words a step
    (7, 16, 256, 32),  # 8 rows a program (int4 only: the int8 head's kernel takes up to 4); GGUF's groups of 32
])
@pytest.mark.parametrize("options", ["plain", "norm", "gated+norm", "bias+residual"])
def test_a_few_rows_match_the_dequantised_weight(m, n, k, group, options, monkeypatch):
    """A batch's decode step of 2 to GEMV_MAX_ROWS rows: `int4_gemv_rows_dp4a_kernel` and its int8 twin, each row as
    the one-row kernels round it (neither the tile kernels nor the dense path runs)."""
    from ringlet.models.quant_cuda import CudaInt8Linear

    def elsewhere(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("not the few-row kernel")

    monkeypatch.setattr(int4_cuda, "tiling", elsewhere)
    monkeypatch.setattr(int4_cuda, "_dense_int4", elsewhere)
    torch.manual_seed(m + n + k)
    rows = 2 * n if "gated" in options else n
    weight = torch.randn(rows, k) * 0.02
    bias = torch.randn(rows).to(torch.bfloat16) if "bias" in options else None
    x = torch.randn(m, k, dtype=torch.bfloat16)
    norm = (1 + 0.1 * torch.randn(k)).to(torch.bfloat16) if "norm" in options else None
    start = torch.randn(m, n, dtype=torch.bfloat16)
    int4 = CudaInt4Linear(GroupQuantized.round(weight, group), None, torch.bfloat16)
    int8 = CudaInt8Linear(weight, None, torch.bfloat16)
    products = [(int4, functools.partial(int4_cuda.int4_matmul, packed=int4.packed, scale=int4.scale,
                                         offset=int4.offset, group_size=group))]
    if m <= int4_cuda.INT8_GEMV_MAX_ROWS:
        products.append((int8, functools.partial(int4_cuda.int8_matmul, codes=int8.weight, scale=int8.scale)))
    for layer, product in products:
        out = start.clone()
        product(x, out=out, bias=bias, norm=norm, eps=1e-5, gated="gated" in options, residual="residual" in options)
        reference = expected(x, layer.dequantize(), norm, bias, "gated" in options,
                             start if "residual" in options else None, int8_x=True)
        torch.testing.assert_close(out.float(), reference, atol=1e-2 if bias is not None else 2e-3, rtol=2e-2)


@pytest.mark.parametrize(("n", "k", "group"), [(300, 256, 128), (24, 128, 32)])
@pytest.mark.parametrize("options", ["plain", "gated+norm", "bias+residual", "bias+gated"])
def test_prompt_rows_multiply_the_dequantised_weight(n, k, group, options, monkeypatch):
    """From DENSE_FROM_ROWS rows of x (a prompt chunk) the weight is dequantised (`int4_dequantize_kernel`: the
    last block of weight rows partly masked) and multiplied densely, in slices of 128 rows here (300: two whole
    slices and a part), with each option as the mixed decode steps use them."""
    monkeypatch.setattr(int4_cuda, "DENSE_SLICE_BYTES", 1)
    torch.manual_seed(n + k)
    rows = 2 * n if "gated" in options else n
    m = int4_cuda.DENSE_FROM_ROWS + 2
    layer = CudaInt4Linear(GroupQuantized.round(torch.randn(rows, k) * 0.02, group), None, torch.bfloat16)
    bias = torch.randn(rows).to(torch.bfloat16) if "bias" in options else None
    dense = int4_cuda.int4_dequantize(layer.packed, layer.scale, layer.offset, group, torch.bfloat16)
    # code * scale + offset rounded once to bf16 (the interpreter's rounding may differ by a unit of the last place)
    torch.testing.assert_close(dense.float(), layer.dequantize(), atol=0, rtol=2 ** -7)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    norm = (1 + 0.1 * torch.randn(k)).to(torch.bfloat16) if "norm" in options else None
    start = torch.randn(m, n, dtype=torch.bfloat16)
    out = start.clone()
    int4_cuda.int4_matmul(x, layer.packed, layer.scale, layer.offset, group, out, bias=bias, norm=norm, eps=1e-5,
                          gated="gated" in options, residual="residual" in options)
    reference = expected(x, layer.dequantize(), norm, bias, "gated" in options,
                         start if "residual" in options else None)
    # the dequantised weight, the normalised x and the outputs are rounded to bf16
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
