"""The one-row int4 tilings chosen on this GPU (`gemv_tuning`): timed over layers that overflow the L2 cache, the
choice kept in the cache and used by the launches, and every tiling it may reach computing the default's product (skips
without a GPU; run through the device tool)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ringlet.models.kernels import gemv_tuning, int4_cuda
from ringlet.models.kernels.gemv_tuning import Projection
from ringlet.models.quant_cuda import CudaInt4Linear
from ringlet.models.quant_format import GroupQuantized
from tests.support.gpu import on_gpu
from tests.support.tilings import reachable


def layers(n: int, k: int, count: int) -> tuple[CudaInt4Linear, ...]:
    g = torch.Generator(device="cuda").manual_seed(n + k)
    return tuple(CudaInt4Linear(GroupQuantized.round(torch.randn(n, k, device="cuda", generator=g) * 0.02, 128),
                                None, torch.bfloat16) for _ in range(count))


@on_gpu
def test_tuning_times_the_tilings_keeps_the_choice_and_launches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(int4_cuda, "_CHOSEN", {})
    monkeypatch.delenv(gemv_tuning.TUNE_ENV, raising=False)
    device = torch.device("cuda", torch.cuda.current_device())
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    n = k = 4096
    count = -(-gemv_tuning.L2_COPIES * l2 // (n * k // 2 + n * k // 128 * 4))
    p = Projection(n, k, 128, False, norm=False, residual=True, layers=layers(n, k, count))
    assert gemv_tuning.worth_timing(p, device)
    assert not gemv_tuning.worth_timing(Projection(n, k, 128, False, False, True, p.layers[:2]), device)
    seconds = gemv_tuning.time_tiling(p, int4_cuda.gemv_tiling(n, k, 128))
    # a launch reads 8.9 MB: between 1 us (8.9 TB/s) and 1 ms
    assert 1e-6 < seconds < 1e-3, seconds

    cache = tmp_path / "gemv-tilings.json"
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    chosen = gemv_tuning.tune([p], device, sms, path=cache)[p.key]
    assert gemv_tuning.valid(chosen, k, 128)
    assert json.loads(cache.read_text())["gpus"][gemv_tuning.gpu_key(device)][p.key]["words"] == chosen.words

    # the decode step's launch (no tiling given) takes the chosen one: the same output as launching it by hand
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    by_hand = torch.zeros(1, n, dtype=torch.bfloat16, device="cuda")
    launched = torch.zeros_like(by_hand)
    layer = p.layers[0]
    int4_cuda._int4_gemv_rows(x, layer.packed, layer.scale, layer.offset, 128, by_hand, n, k, None, None, 1e-5, False,
                              True, False, chosen)
    layer.project(x, launched, residual=True)
    assert torch.equal(by_hand, launched)


@pytest.mark.parametrize(("n", "k", "gated"), [(6144, 4096, False), (4096, 14336, False), (14336, 4096, True)])
@on_gpu
def test_every_tiling_within_two_moves_computes_the_dequantised_product(n, k, gated):
    """Each tiling within two moves of the default, with the input's norm (and gate/up's SiLU gate), against the dequantised
    weight (x is rounded to int8 per block of 32, hence the tolerance)."""
    (linear,) = layers(2 * n if gated else n, k, 1)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    norm = (1 + 0.3 * torch.randn(k, device="cuda")).bfloat16()
    y = F.linear(F.rms_norm(x.float(), (k,), norm.float(), 1e-5), linear.dequantize())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    pdl = int4_cuda.pdl_available(x.device)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tiling in sorted(reachable(n, k, gated, sms=sms), key=str):
        out = torch.zeros(1, n, device="cuda", dtype=torch.bfloat16)
        int4_cuda._int4_gemv_rows(x, linear.packed, linear.scale, linear.offset, 128, out, n, k, None, norm, 1e-5,
                                  gated, False, pdl, tiling)
        assert (out.float() - y).abs().max() <= 2e-2 * y.abs().max(), tiling
