"""The AVX-512 VNNI kernels (`models/kernels/cpu_vnni`) against the same products in float, x rounded as the kernels
round it; the decode attention against SDPA; and the linears and the attention that run them."""

import pytest
import torch
import torch.nn.functional as F

from ringlet.models.kernels import cpu_vnni
from ringlet.models.paged_cache import BatchLayout, SequenceStep
from ringlet.models.quant import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    dequantizing_in_matmul,
    embed_rows,
    int4_linear,
)
from ringlet.models.quant_format import GroupQuantized, Int8Rows, round_rows_int8
from tests.support.random_models import BASE, random_model

pytestmark = pytest.mark.skipif(not cpu_vnni.available(), reason="this CPU has no AVX-512 VNNI (or no compiler)")


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded to int8 per block of 32 values, step = the block's largest magnitude / 127."""
    blocks = x.view(x.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(step > 0, torch.round(blocks / step), torch.zeros_like(blocks))
    return (codes * step).view_as(x)


@pytest.mark.parametrize(("n", "k", "m"), [(3072, 576, 1), (576, 1536, 1), (300, 544, 3), (64, 32, 2), (1, 4096, 1)])
def test_int8_product_matches_float(n: int, k: int, m: int) -> None:
    gen = torch.Generator().manual_seed(n + k + m)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen) * 0.01 + 1e-4
    x = torch.randn(m, k, generator=gen)
    x[0, :32] = 0  # a block of zeros: step 0
    want = rounded(x) @ (codes.float() * scales[:, None]).t()
    got = torch.ops.ringlet_cpu.int8_linear(x, codes, scales)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # rounding x is the only difference from the exact product: about 1% of the largest output
    exact = x @ (codes.float() * scales[:, None]).t()
    assert (got - exact).abs().max() < 0.03 * exact.abs().max()


def test_int8_linear_of_shared_codes_runs_it_for_one_row() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 128, generator=gen)
    linear = Int8Linear(weight, None, torch.bfloat16, tiles=False)  # codes a tied embedding looks rows up in
    assert linear.vnni and not linear.tiled and linear.weight.dtype == torch.int8
    x = torch.randn(1, 1, 128, generator=gen).bfloat16()
    reference = torch._weight_int8pack_mm(x.view(1, -1), linear.weight, linear.scales).view(1, 1, -1)
    got = linear(x)
    assert got.shape == (1, 1, 256) and got.dtype == torch.bfloat16
    assert not torch.equal(got, reference)  # x rounded to int8: not PyTorch's kernel
    torch.testing.assert_close(got.float(), reference.float(), rtol=0, atol=0.03 * reference.abs().max().item())
    two = torch.randn(2, 128, generator=gen).bfloat16()  # more rows: PyTorch's kernel
    assert torch.equal(linear(two), torch._weight_int8pack_mm(two, linear.weight, linear.scales))


def test_shared_codes_of_minus_128_keep_pytorchs_kernel() -> None:
    codes = torch.full((64, 64), 5, dtype=torch.int8)
    codes[3, 7] = -128  # |x| times -(-128) would wrap: the one-row kernel cannot take it
    linear = Int8Linear(Int8Rows(codes, torch.ones(64)), None, torch.bfloat16, tiles=False)
    assert not linear.vnni
    assert not cpu_vnni.takes(codes[:, :48])  # K not a multiple of 32
    tiled = Int8Linear(Int8Rows(codes, torch.ones(64)), None, torch.bfloat16)  # the tiles hold codes + 128
    assert tiled.tiled and torch.equal(tiled.codes(), codes)


@pytest.mark.parametrize(("n", "k", "m"), [(3072, 576, 1), (576, 1536, 5), (96, 1024, 2), (16, 32, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_tiles_match_float(n: int, k: int, m: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + k + m)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen) * 0.01 + 1e-4
    x = torch.randn(m, k, generator=gen).to(dtype)
    tiles = cpu_vnni.tile_int8(codes)
    assert tiles.shape == (n // 16, k * 16) and torch.equal(cpu_vnni.untile_int8(tiles), codes)
    got = torch.ops.ringlet_cpu.int8_tiled_linear(x, tiles, scales)
    assert got.shape == (m, n) and got.dtype == dtype
    want = rounded(x.float()) @ (codes.float() * scales[:, None]).t()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_int8_linear_keeps_tiles() -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 256, generator=gen)
    linear = Int8Linear(weight, torch.randn(64, generator=gen), torch.bfloat16)
    assert linear.tiled and not linear.vnni and linear.weight.shape == (4, 256 * 16)
    dense = linear.codes().float() * linear.scales.float()[:, None]
    for rows in (1, 5, Int8Linear.DENSE_FROM_ROWS_TILED - 1):
        x = torch.randn(rows, 256, generator=gen).bfloat16()
        exact = x.float() @ dense.t() + linear.bias.float()
        assert (linear(x).float() - exact).abs().max() < 0.03 * exact.abs().max()
    long = torch.randn(Int8Linear.DENSE_FROM_ROWS_TILED, 256, generator=gen).bfloat16()  # a long chunk: dense
    torch.testing.assert_close(linear(long), F.linear(long, linear.codes().bfloat16() * linear.scales[:, None],
                                                      linear.bias))
    x = torch.randn(3, 256, generator=gen).bfloat16()
    assert dequantizing_in_matmul(linear) == 1 and not linear.tiled  # plain codes, which any device multiplies
    assert linear.weight.dtype == torch.int8 and linear.weight.shape == (64, 256)
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight.bfloat16() * linear.scales[:, None], linear.bias))


def int4_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group: int) -> torch.Tensor:
    """x . ((code - 8) * scale + zero), the codes' part with x rounded, the zeros' part with x as it is."""
    m, k = x.shape
    n = codes.shape[0]
    by_group = (rounded(x).view(m, 1, k // group, group) * codes.float().view(1, n, k // group, group)).sum(-1)
    sums = x.view(m, 1, k // group, group).sum(-1)
    return (by_group * scale.float()).sum(-1) + (sums * (zero.float() - 8 * scale.float())).sum(-1)


@pytest.mark.parametrize(("n", "k", "group", "m"), [(3072, 576, 32, 1), (576, 1536, 32, 5), (96, 1024, 64, 2),
                                                    (64, 1024, 128, 7), (32, 2048, 256, 1), (16, 64, 64, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_tiles_match_float(n: int, k: int, group: int, m: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + k + group + m)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).bfloat16()
    zero = (torch.randn(n, k // group, generator=gen) * 0.02).bfloat16()
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()  # [K / group, N, 2]
    x = torch.randn(m, k, generator=gen).to(dtype)
    tiles = cpu_vnni.tile_int4(codes)
    assert tiles.shape == (n // 16, k * 8) and torch.equal(cpu_vnni.untile_int4(tiles), codes)
    got = torch.ops.ringlet_cpu.int4_linear(x, tiles, scale_zero, group)
    assert got.shape == (m, n) and got.dtype == dtype
    want = int4_reference(x.float(), codes, scale, zero, group)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_int4_linear_keeps_tiles_and_gives_its_codes_back() -> None:
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (64, 256), dtype=torch.uint8, generator=gen)
    groups = GroupQuantized(codes, torch.rand(64, 8, generator=gen) * 0.02 + 1e-3,
                            torch.randn(64, 8, generator=gen) * 0.02, 32)
    linear = Int4Linear(groups, None, torch.bfloat16)
    assert linear.tiled and linear.weight.shape == (4, 256 * 8) and linear.nibbles is None
    assert torch.equal(linear.codes(), codes)
    dense = linear.dense_weight(torch.float32)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    one = linear(x).float()
    exact = x.float() @ dense.t()
    assert (one - exact).abs().max() < 0.03 * exact.abs().max()  # x rounded to int8 per block
    long = torch.randn(Int4Linear.DENSE_FROM_ROWS_TILED, 256, generator=gen).bfloat16()  # a long chunk: dense
    torch.testing.assert_close(linear(long), F.linear(long, linear.dense_weight(torch.bfloat16)))
    assert not Int4Linear(groups, None, torch.float32).tiled  # float32 scales: PyTorch's kernel


@pytest.mark.parametrize(("n", "k", "group", "m"), [(3072, 576, 32, 1), (576, 1536, 32, 5), (96, 1024, 64, 2),
                                                    (16, 64, 32, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int5_tiles_match_float(n: int, k: int, group: int, m: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + k + group + m)
    codes = torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).bfloat16()
    zero = (torch.randn(n, k // group, generator=gen) * 0.02).bfloat16()
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
    x = torch.randn(m, k, generator=gen).to(dtype)
    tiles, high = cpu_vnni.tile_int5(codes)
    assert tiles.shape == (n // 16, k * 8) and high.shape == (n // 16, k * 2)
    assert torch.equal(cpu_vnni.untile_int5(tiles, high), codes)
    assert torch.equal(tiles, cpu_vnni.tile_int4(codes & 0x0F))
    got = torch.ops.ringlet_cpu.int5_linear(x, tiles, high, scale_zero, group)
    assert got.shape == (m, n) and got.dtype == dtype
    want = int4_reference(x.float(), codes, scale, zero, group)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())
    low_only = torch.ops.ringlet_cpu.int4_linear(x, tiles, scale_zero, group)  # the fifth bits matter
    assert (low_only.float() - want).abs().max() > 0.1 * want.abs().max()


def test_int4_linear_of_5_bit_codes() -> None:
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 32, (48, 256), dtype=torch.uint8, generator=gen)
    groups = GroupQuantized(codes, torch.rand(48, 8, generator=gen) * 0.02 + 1e-3,
                            torch.randn(48, 8, generator=gen) * 0.02, 32, bits=5)
    linear = Int4Linear(groups, None, torch.bfloat16)
    assert linear.bits == 5 and linear.tiled and linear.high is not None and linear.nibbles is None
    assert torch.equal(linear.codes(), codes) and linear.groups().bits == 5
    dense = linear.dense_weight(torch.float32)
    torch.testing.assert_close(dense, groups.dequantize(), rtol=0, atol=0.01 * dense.abs().max().item())  # bf16
    x = torch.randn(3, 256, generator=gen).bfloat16()
    exact = x.float() @ dense.t()
    assert (linear(x).float() - exact).abs().max() < 0.03 * exact.abs().max()
    long = torch.randn(Int4Linear.DENSE_FROM_ROWS_TILED, 256, generator=gen).bfloat16()
    torch.testing.assert_close(linear(long), F.linear(long, linear.dense_weight(torch.bfloat16)))
    assert dequantizing_in_matmul(linear) == 1  # plain tensor operations over the tiles, which stay
    torch.testing.assert_close(linear(x), F.linear(x, linear.dense_weight(torch.bfloat16)))
    with pytest.raises(ValueError, match="5-bit codes run on ringlet's CPU kernels only"):
        Int4Linear(groups, None, torch.float32)


def test_5_bit_codes_the_kernels_cannot_take_become_int8() -> None:
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (40, 256), dtype=torch.uint8, generator=gen)  # 40 rows: not whole tiles
    groups = GroupQuantized(codes, torch.rand(40, 8, generator=gen) * 0.02 + 1e-3,
                            torch.randn(40, 8, generator=gen) * 0.02, 32, bits=5)
    for dtype in (torch.bfloat16, torch.float32):
        linear = int4_linear(groups, None, dtype)
        assert isinstance(linear, Int8Linear)
        x = torch.randn(2, 256, generator=gen).to(dtype)
        exact = x.float() @ groups.dequantize().t()
        assert (linear(x).float() - exact).abs().max() < 0.02 * exact.abs().max()


def test_a_tiled_embedding_and_its_tied_head_share_one_tensor() -> None:
    gen = torch.Generator().manual_seed(5)
    rows = round_rows_int8(torch.randn(96, 64, generator=gen))
    embedding = Int8Embedding(rows, torch.bfloat16)
    plain = Int8Embedding(rows, torch.bfloat16)
    plain.untile()
    assert embedding.tiled and not plain.tiled and torch.equal(embedding.codes(), rows.codes)
    ids = torch.tensor([[0, 95, 17, 17, 40]])
    assert torch.equal(embedding(ids), plain(ids))  # a row read in place from the tiles, the same values
    out = torch.empty(5, 64, dtype=torch.bfloat16)
    embed_rows(embedding, ids[0], out)
    assert torch.equal(out, plain(ids)[0])
    head = embedding.head(torch.bfloat16)
    assert isinstance(head, Int8Linear) and head.tiled and head.weight is embedding.weight
    assert (head.out_features, head.in_features) == (96, 64)
    x = torch.randn(2, 64, generator=gen).bfloat16()
    exact = x.float() @ (rows.codes.float() * rows.step[:, None]).t()
    assert (head(x).float() - exact).abs().max() < 0.03 * exact.abs().max()
    model = torch.nn.ModuleDict({"embed": embedding, "head": head})
    assert dequantizing_in_matmul(model) == 1  # plain codes for another device, still one tensor
    assert not embedding.tiled and head.weight is embedding.weight and torch.equal(head.weight, rows.codes)
    torch.testing.assert_close(head(x), F.linear(x, rows.codes.bfloat16() * head.scales[:, None]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "heads", "kv_heads", "dim", "context"), [(1, 9, 3, 64, 300), (3, 8, 2, 128, 37),
                                                                           (2, 4, 4, 64, 17)])
def test_decode_attention_matches_sdpa(dtype: torch.dtype, rows: int, heads: int, kv_heads: int, dim: int,
                                       context: int) -> None:
    gen = torch.Generator().manual_seed(rows * heads + context)
    keys = torch.randn(1000, kv_heads, dim, generator=gen).to(dtype)
    values = torch.randn(1000, kv_heads, dim, generator=gen).to(dtype)
    keys[999] = values[999] = 0  # the pad slot
    q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
    slots = torch.randint(0, 999, (rows, context), generator=gen)
    visible = torch.rand(rows, context, generator=gen) < 0.7
    visible[:, 0] = True
    slots[~visible] = 999
    k, v = keys[slots].transpose(1, 2).float(), values[slots].transpose(1, 2).float()  # [B, KV, S, D]
    want = F.scaled_dot_product_attention(q.float().view(rows, kv_heads, heads // kv_heads, dim), k, v,
                                          attn_mask=visible[:, None, None, :], scale=0.1).reshape(rows, heads, dim)
    got = torch.ops.ringlet_cpu.decode_attention(q, keys, values, slots, visible, 0.1)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_paged_decode_step_runs_the_attention_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step of a small model through the op, and without it (gathered keys, SDPA): the same logits."""
    torch.manual_seed(0)
    model = random_model(BASE, torch.float32)
    args = model.args
    model.prepare_positions(64)
    calls = []
    real = torch.ops.ringlet_cpu.decode_attention

    def counting(*inputs):
        calls.append(1)
        return real(*inputs)

    def logits(op_on: bool) -> torch.Tensor:
        monkeypatch.setattr(cpu_vnni, "loaded", op_on)
        cache = model.make_paged_cache(8, 16)
        prompt = BatchLayout.build([SequenceStep(0, 20, [0, 1]), SequenceStep(0, 7, [2])], 16, "cpu", cache.pad_slot)
        with torch.inference_mode():
            model.forward_batch(torch.arange(27) % args.vocab_size, cache, prompt)
            decode = BatchLayout.build([SequenceStep(20, 1, [0, 1]), SequenceStep(7, 1, [2])], 16, "cpu",
                                       cache.pad_slot)
            return model.forward_batch(torch.tensor([5, 9]), cache, decode)

    monkeypatch.setattr(torch.ops.ringlet_cpu, "decode_attention", counting, raising=False)
    with_op = logits(True)
    assert calls  # the decode rows went through the op
    count = len(calls)
    without = logits(False)
    assert len(calls) == count
    torch.testing.assert_close(with_op, without, rtol=1e-4, atol=1e-4)


def test_the_ops_compile_whole() -> None:
    """torch.compile keeps each op whole (their fake implementations give the shapes): the compiled products are
    the eager ones."""
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8, generator=gen)
    linear = Int4Linear(GroupQuantized(codes, torch.rand(64, 4, generator=gen) * 0.02 + 1e-3,
                                       torch.randn(64, 4, generator=gen) * 0.02, 32), None, torch.bfloat16)
    five = Int4Linear(GroupQuantized(codes | 16, torch.rand(64, 4, generator=gen) * 0.02 + 1e-3,
                                     torch.randn(64, 4, generator=gen) * 0.02, 32, bits=5), None, torch.bfloat16)
    head = Int8Linear(torch.randn(96, 64, generator=gen), None, torch.bfloat16)
    tied = Int8Linear(torch.randn(96, 64, generator=gen), None, torch.bfloat16, tiles=False)
    keys, values = torch.randn(40, 2, 16, generator=gen).bfloat16(), torch.randn(40, 2, 16, generator=gen).bfloat16()
    slots, visible = torch.arange(10)[None], torch.ones(1, 10, dtype=torch.bool)

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = linear(x)
        attended = torch.ops.ringlet_cpu.decode_attention(hidden[:, :32].reshape(1, 2, 16), keys, values, slots,
                                                          visible, 0.25)
        mixed = hidden + attended.reshape(1, 32).repeat(1, 2)
        return head(mixed), tied(mixed), five(x)

    x = torch.randn(1, 128, generator=gen).bfloat16()
    with torch.inference_mode():
        compiled, eager = torch.compile(step, fullgraph=True)(x), step(x)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))


def test_a_build_lock_left_by_a_killed_process_is_dropped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import time

    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.touch()
    fresh.touch()
    old = time.time() - cpu_vnni.STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    cpu_vnni._drop_stale_lock(stale)
    cpu_vnni._drop_stale_lock(fresh)  # a build under way keeps its lock
    cpu_vnni._drop_stale_lock(tmp_path / "none")
    assert not stale.exists() and fresh.exists()
