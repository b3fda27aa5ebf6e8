"""Choosing the one-row int4 tilings on the GPU at hand (`gemv_tuning`): the tilings it may move to, the margin
a tiling must beat the default by, and the cache that spares a later load the timing. A fake timer stands in for
the GPU here; tests/worker/gpu/test_gemv_tuning_cuda.py times the kernels on one. With Triton's interpreter, every
tiling within two moves of a small shape's default computes what the default computes."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from ringlet.models.kernels import gemv_tuning, int4_cuda
from ringlet.models.kernels.gemv_tuning import Projection
from ringlet.models.kernels.int4_cuda import GemvTiling
from ringlet.models.quant_cuda import CudaInt4Linear
from ringlet.models.quant_format import GroupQuantized
from tests.support.tilings import reachable

LLAMA_8B = [(6144, 4096, False), (4096, 4096, False), (14336, 4096, True), (4096, 14336, False)]
GPU = torch.device("cuda", 0)  # only named: nothing here runs on it


@pytest.fixture(autouse=True)
def no_chosen_tilings(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(int4_cuda, "_CHOSEN", {})
    monkeypatch.delenv(gemv_tuning.TUNE_ENV, raising=False)


def projection(n: int = 4096, k: int = 4096, gated: bool = False) -> Projection:
    return Projection(n, k, 128, gated, norm=not gated, residual=False, layers=())


@pytest.mark.parametrize(("n", "k", "gated"), LLAMA_8B)
def test_the_neighbours_are_tilings_the_kernel_takes_with_more_and_less_in_flight(n, k, gated):
    default = int4_cuda.gemv_tiling(n, k, 128, gated, 132)
    found = gemv_tuning.neighbours(default, k, 128)
    assert len(found) == len(set(found)) >= 5 and default not in found
    assert all(gemv_tuning.valid(t, k, 128) for t in reachable(n, k, gated, 3))
    # more weight in flight a program (rows or words) and less are both tried
    assert any(t.block_n * t.words > default.block_n * default.words for t in found)
    assert any(t.block_n * t.words < default.block_n * default.words for t in found)


def test_a_tiling_that_splits_a_group_or_exceeds_a_step_is_not_valid():
    assert gemv_tuning.valid(GemvTiling(16, 256, 8), 4096, 128)
    assert not gemv_tuning.valid(GemvTiling(16, 8, 4), 4096, 128)  # 64 columns: half a group
    assert not gemv_tuning.valid(GemvTiling(64, 256, 8), 4096, 128)  # 16,384 words a step
    assert not gemv_tuning.valid(GemvTiling(16, 256, 8, stages=2, ahead=True), 4096, 128)
    assert not gemv_tuning.valid(GemvTiling(16, 96, 8), 4096, 128)  # 512 words a row: not whole steps


class FakeTimer:
    """Seconds per tiling from a table (by tiling, or by projection key and tiling), 10 us otherwise; a tiling in
    `noisy` is fast only when first timed."""

    def __init__(self, seconds: dict, noisy: frozenset[GemvTiling] = frozenset()) -> None:  # type: ignore[type-arg]
        self.seconds, self.noisy = seconds, noisy
        self.calls: list[GemvTiling] = []

    def __call__(self, p: Projection, t: GemvTiling) -> float:
        first = t not in self.calls
        self.calls.append(t)
        base = self.seconds.get((p.key, t), self.seconds.get(t, 10e-6))
        return base if first or t not in self.noisy else 10e-6


def test_the_choice_moves_to_a_faster_neighbour_only_when_it_wins_again_by_the_margin():
    p = projection()
    default = int4_cuda.gemv_tiling(p.n, p.k, p.group, p.gated, 132)
    first = gemv_tuning.neighbours(default, p.k, p.group)[0]
    second = next(t for t in gemv_tuning.neighbours(first, p.k, p.group) if t != default)
    assert gemv_tuning.choose(p, default, FakeTimer({first: 8e-6})) == first
    # two moves: the second from the first's neighbours
    assert gemv_tuning.choose(p, default, FakeTimer({first: 8e-6, second: 6e-6})) == second
    assert gemv_tuning.choose(p, default, FakeTimer({first: 8e-6, second: 6e-6}), rounds=1) == first
    # 1% faster: within the spread of runs
    assert gemv_tuning.choose(p, default, FakeTimer({first: 9.9e-6})) == default
    # fast only the first time it was timed
    assert gemv_tuning.choose(p, default, FakeTimer({first: 8e-6}, noisy=frozenset({first}))) == default
    timer = FakeTimer({})
    assert gemv_tuning.choose(p, default, timer) == default
    assert len(timer.calls) == 1 + len(gemv_tuning.neighbours(default, p.k, p.group))  # nothing timed again


def test_the_choice_is_used_for_launches_kept_on_disk_and_not_timed_again(tmp_path, caplog):
    cache = tmp_path / "gemv-tilings.json"
    projections = [projection(n, k, gated) for n, k, gated in LLAMA_8B]
    winners = {}
    seconds = {}
    for p in projections:
        candidate = gemv_tuning.neighbours(int4_cuda.gemv_tiling(p.n, p.k, p.group, p.gated, 132), p.k, p.group)[-1]
        winners[p.key] = candidate
        seconds[p.key, candidate] = 5e-6
    timer = FakeTimer(seconds)
    with caplog.at_level(logging.INFO, logger=gemv_tuning.__name__):
        chosen = gemv_tuning.tune(projections, GPU, 132, timer=timer, path=cache, key="GPU A")
    assert chosen == winners
    assert "timing int4 tilings for GPU A" in caplog.text
    for p in projections:
        assert int4_cuda._CHOSEN[0, p.n, p.k, p.group, p.gated] == winners[p.key]
    stored = json.loads(cache.read_text())
    assert set(stored["gpus"]) == {"GPU A"} and set(stored["gpus"]["GPU A"]) == set(winners)

    def no_timing(p: Projection, t: GemvTiling) -> float:
        raise AssertionError("a cached choice was timed again")

    int4_cuda._CHOSEN.clear()
    assert gemv_tuning.tune(projections, GPU, 132, timer=no_timing, path=cache, key="GPU A") == winners
    assert len(int4_cuda._CHOSEN) == len(projections)

    # another GPU (or Triton, or kernel source) times its own, keeping the first one's
    other = gemv_tuning.tune(projections[:1], GPU, 132, timer=FakeTimer({}), path=cache,
                             key="GPU B")
    assert other == {projections[0].key: int4_cuda.gemv_tiling(6144, 4096, 128, False, 132)}
    assert set(json.loads(cache.read_text())["gpus"]) == {"GPU A", "GPU B"}


def test_a_damaged_cache_is_timed_again_and_rewritten(tmp_path, caplog):
    cache = tmp_path / "gemv-tilings.json"
    cache.write_text("{not json")
    p = projection()
    with caplog.at_level(logging.WARNING, logger=gemv_tuning.__name__):
        chosen = gemv_tuning.tune([p], GPU, 132, timer=FakeTimer({}), path=cache, key="GPU A")
    assert "ignoring the int4 tiling cache" in caplog.text
    assert chosen[p.key] == int4_cuda.gemv_tiling(p.n, p.k, p.group, p.gated, 132)
    assert json.loads(cache.read_text())["gpus"]["GPU A"][p.key]["block_n"] == chosen[p.key].block_n
    # an entry of fields the tiling no longer has is timed again
    cache.write_text(json.dumps({"version": gemv_tuning.CACHE_VERSION, "gpus": {"GPU A": {p.key: {"rows": 3}}}}))
    timer = FakeTimer({})
    gemv_tuning.tune([p], GPU, 132, timer=timer, path=cache, key="GPU A")
    assert timer.calls


def test_an_unwritable_cache_leaves_the_choice_in_use(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    p = projection()
    with caplog.at_level(logging.WARNING, logger=gemv_tuning.__name__):
        chosen = gemv_tuning.tune([p], GPU, 132, timer=FakeTimer({}),
                                  path=blocked / "gemv-tilings.json", key="GPU A")
    assert "cannot write the int4 tiling cache" in caplog.text
    assert int4_cuda._CHOSEN[0, p.n, p.k, p.group, p.gated] == chosen[p.key]


def test_tuning_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(gemv_tuning.TUNE_ENV, "0")

    def no_timing(p: Projection, t: GemvTiling) -> float:
        raise AssertionError("timed while turned off")

    assert gemv_tuning.tune([projection()], GPU, 132, timer=no_timing, path=tmp_path / "c.json", key="GPU A") == {}
    assert not int4_cuda._CHOSEN and not (tmp_path / "c.json").exists()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter runs the kernel on CPU")
@pytest.mark.parametrize(("n", "k", "gated"), [(32, 2048, False), (16, 1024, True)])
def test_every_tiling_within_two_moves_computes_what_the_default_computes(n, k, gated):
    torch.manual_seed(n)
    rows = 2 * n if gated else n
    layer = CudaInt4Linear(GroupQuantized.round(torch.randn(rows, k) * 0.02, 128), None, torch.bfloat16)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    norm = (1 + 0.1 * torch.randn(k)).to(torch.bfloat16)
    outs = []
    for tiling in sorted(reachable(n, k, gated), key=lambda t: t != int4_cuda.gemv_tiling(n, k, 128, gated, 132)):
        out = torch.zeros(1, n, dtype=torch.bfloat16)
        int4_cuda._int4_gemv_rows(x, layer.packed, layer.scale, layer.offset, 128, out, n, k, None, norm, 1e-5, gated,
                                  False, False, tiling)
        outs.append(out.float())
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=2e-3, rtol=2e-2)
