"""The one-row int4 tilings the tuner (`gemv_tuning`) may reach from a shape's default."""

from __future__ import annotations

from ringlet.models.kernels import gemv_tuning, int4_cuda
from ringlet.models.kernels.int4_cuda import GemvTiling


def reachable(n: int, k: int, gated: bool, moves: int = 2, sms: int = 132, group: int = 128) -> set[GemvTiling]:
    """The default tiling of W [n, k] (gate/up: 2n rows) and every tiling within `moves` moves of it."""
    found = {int4_cuda.gemv_tiling(n, k, group, gated, sms)}
    for _ in range(moves):
        found |= {t for f in found for t in gemv_tuning.neighbours(f, k, group)}
    return found
