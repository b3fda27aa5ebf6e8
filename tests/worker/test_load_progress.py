"""A runner reports each layer its stage loads: the loader calls its listeners, the runner turns them into Loading
messages (the dashboard's bar and the instance's detail)."""

from __future__ import annotations

import io

import pytest
import torch

from ringlet.models.catalog import CPU_STORED_INT4, embedded_card
from ringlet.models.loader import load_stage, reporting_load_progress
from ringlet.models.quant import cpu_supports_bf16
from ringlet.models.store import ModelStore
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, Instance, InstanceType, Shard
from ringlet.shared.messages import FROM_RUNNER, Loading, LoadShard
from ringlet.shared.state import InstanceCreated, LayerLoad, RunnerProgressed, State, apply
from ringlet.shared.wire import decode
from ringlet.worker.runner import Outbox, _layers_loaded, fetch_stage_files, stage_weight_bytes
from tests.support.hub import REPO_ID


def test_every_layer_loaded_is_reported_with_the_bytes_kept_so_far_then_the_whole_stage() -> None:
    calls: list[tuple[int, int, int]] = []
    with reporting_load_progress(lambda *call: calls.append(call)):
        stage = load_stage(None, 4, 7, dtype=torch.bfloat16, quantize="int8")
    assert [(done, total) for done, total, _ in calls] == [(1, 3), (2, 3), (3, 3), (3, 3)]
    kept = [k for *_, k in calls]
    layers = sum(t.numel() * t.element_size() for t in (*stage.model.layers.parameters(),
                                                         *stage.model.layers.buffers()))
    whole = sum(t.numel() * t.element_size() for t in (*stage.model.parameters(), *stage.model.buffers()))
    assert kept[0] < kept[1] < kept[2] == layers and kept[3] == whole
    load_stage(None, 0, 1)
    assert len(calls) == 4  # outside the block nothing is reported


def test_a_loaded_stage_reports_the_bytes_placement_counted_for_it() -> None:
    from ringlet.models.catalog import card_from_path
    from ringlet.models.loader import resolve_model_path

    calls: list[tuple[int, int, int]] = []
    with reporting_load_progress(lambda *call: calls.append(call)):
        load_stage(None, 0, 30, dtype=torch.bfloat16, quantize="int4 where stored")
    card = card_from_path("embedded", resolve_model_path(None))
    assert calls[-2][2] < calls[-1][2], "the embedding, the lm_head and the final norm count too"
    assert calls[-1] == (30, 30, card.stage_bytes(0, 30, CPU_STORED_INT4))


def test_the_runner_sends_each_layer_as_loading_progress_with_its_bytes() -> None:
    stream = io.BytesIO()
    report = _layers_loaded(Outbox(stream), 0.05, 0.85, bytes_total=3 << 30)
    report(15, 30, 1 << 30)
    report(30, 30, 2 << 30)
    sent = [FROM_RUNNER.validate_json(line) for line in stream.getvalue().splitlines()]
    assert all(isinstance(message, Loading) for message in sent)
    assert [(pytest.approx(m.progress), m.detail) for m in sent] == [  # type: ignore[union-attr]
        (0.45, "loaded 15/30 layers, 1/3 GiB"), (0.85, "loaded 30/30 layers, 2/3 GiB")]
    assert sent[0].load == LayerLoad(layers_loaded=15, layers_total=30, bytes_loaded=1 << 30,  # type: ignore[union-attr]
                                     bytes_total=3 << 30)


def test_the_stage_bytes_come_from_the_model_card_in_the_engines_format() -> None:
    shards = [Shard(node_id="a", rank=0, start=0, end=10, num_layers=30, engine="cpu"),
              Shard(node_id="b", rank=1, start=10, end=30, num_layers=30, engine="cpu")]
    bound = BoundInstance(instance=Instance(instance_id="i", model="default", instance_type=InstanceType.CPU_RING,
                                            shards=shards), node_id="b")
    card = embedded_card()
    fp32 = LoadShard(bound=bound, config=EngineConfig(precision="fp32"))
    assert stage_weight_bytes(fp32) == card.stage_bytes(10, 30, "float32")
    held = CPU_STORED_INT4 if cpu_supports_bf16() else "float32"  # the CPU engine quantises where bf16 is native
    assert stage_weight_bytes(LoadShard(bound=bound, config=EngineConfig())) == card.stage_bytes(10, 30, held)
    missing = bound.model_copy(update={"instance": bound.instance.model_copy(update={"model": "nobody/nothing"})})
    assert stage_weight_bytes(LoadShard(bound=missing, config=EngineConfig())) is None


def test_state_carries_each_runners_load_and_the_instances_together() -> None:
    shards = [Shard(node_id="a", rank=0, start=0, end=10, num_layers=30, engine="cpu"),
              Shard(node_id="b", rank=1, start=10, end=30, num_layers=30, engine="cpu")]
    instance = Instance(instance_id="i", model="m", instance_type=InstanceType.CPU_RING, shards=shards)
    state = apply(State(), InstanceCreated(instance=instance, created_at=0.0))
    for node, load in (("a", LayerLoad(layers_loaded=10, layers_total=10, bytes_loaded=100, bytes_total=120)),
                       ("b", LayerLoad(layers_loaded=5, layers_total=20, bytes_loaded=50, bytes_total=240))):
        state = apply(state, RunnerProgressed(instance_id="i", node_id=node, progress=0.5, detail="", load=load))
    state = apply(state, RunnerProgressed(instance_id="i", node_id="b", progress=0.9, detail="warming up"))
    record = state.instances["i"]
    assert record.runners["b"].load == LayerLoad(layers_loaded=5, layers_total=20, bytes_loaded=50, bytes_total=240)
    assert record.load == LayerLoad(layers_loaded=15, layers_total=30, bytes_loaded=150, bytes_total=360)
    dumped = record.model_dump(mode="json")
    assert dumped["progress"] == 0.5 and dumped["load"]["layers_loaded"] == 15  # the old fields stay beside it


def test_a_repo_not_on_disk_is_fetched_with_its_bytes_as_progress(hub, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stream = io.BytesIO()
    instance = Instance(instance_id="inst-1", model=REPO_ID, instance_type=InstanceType.CPU_RING,
                        shards=[Shard(node_id="a", rank=0, start=0, end=2, num_layers=4),
                                Shard(node_id="b", rank=1, start=2, end=4, num_layers=4)])
    fetch_stage_files(LoadShard(bound=BoundInstance(instance=instance, node_id="a")), Outbox(stream), until=0.05)
    reports = [decode(FROM_RUNNER, line, "test") for line in stream.getvalue().splitlines()]
    assert reports and all(isinstance(r, Loading) and r.detail.startswith("downloading") for r in reports)
    assert reports[-1].progress == pytest.approx(0.05)
    assert ModelStore().get(REPO_ID) is not None
