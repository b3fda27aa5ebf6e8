"""The frame of an embeddings request down a ring is checked as every frame is: a neighbour that announces no inputs,
or more positions than a frame may carry, breaks the ring instead of making this stage allocate what it says."""

from __future__ import annotations

import pytest

from ringlet.net.ring import MAX_FRAME_POSITIONS, Op, RingBrokenError, check_frame


def test_an_embed_frame_within_the_limits_passes() -> None:
    check_frame(Op.EMBED, 3, 17)
    check_frame(Op.EMBED, 4, MAX_FRAME_POSITIONS // 4)


@pytest.mark.parametrize(("inputs", "positions"), [(0, 5), (-1, 5), (4, MAX_FRAME_POSITIONS // 4 + 1), (2, -1),
                                                   (MAX_FRAME_POSITIONS + 1, 1)])
def test_an_embed_frame_out_of_bounds_breaks_the_ring(inputs: int, positions: int) -> None:
    with pytest.raises(RingBrokenError):
        check_frame(Op.EMBED, inputs, positions)
