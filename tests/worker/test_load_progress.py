"""A runner reports each layer its stage loads: the loader calls its listeners, the runner turns them into Loading
messages (the dashboard's bar and the instance's detail)."""

from __future__ import annotations

import io

import pytest
import torch

from ringlet.models.loader import load_stage, reporting_load_progress
from ringlet.shared.messages import FROM_RUNNER, Loading
from ringlet.worker.runner import Outbox, _layers_loaded


def test_every_layer_loaded_is_reported_with_the_bytes_kept_so_far() -> None:
    calls: list[tuple[int, int, int]] = []
    with reporting_load_progress(lambda *call: calls.append(call)):
        stage = load_stage(None, 4, 7, dtype=torch.bfloat16, quantize="int8")
    assert [(done, total) for done, total, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    kept = [k for *_, k in calls]
    layers = sum(t.numel() * t.element_size() for t in (*stage.model.layers.parameters(),
                                                         *stage.model.layers.buffers()))
    assert kept[0] < kept[1] < kept[2] == layers
    load_stage(None, 0, 1)
    assert len(calls) == 3  # outside the block nothing is reported


def test_the_runner_sends_each_layer_as_loading_progress() -> None:
    stream = io.BytesIO()
    report = _layers_loaded(Outbox(stream), 0.05, 0.85)
    report(15, 30, 1 << 30)
    report(30, 30, 2 << 30)
    sent = [FROM_RUNNER.validate_json(line) for line in stream.getvalue().splitlines()]
    assert all(isinstance(message, Loading) for message in sent)
    assert [(pytest.approx(m.progress), m.detail) for m in sent] == [  # type: ignore[union-attr]
        (0.45, "loaded 15 of 30 layers (1.00 GiB)"), (0.85, "loaded 30 of 30 layers (2.00 GiB)")]
