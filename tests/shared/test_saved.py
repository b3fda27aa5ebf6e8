"""The file of instances a node creates again after a restart: added and removed by id (or kept under the id of the
instance placed again in its stead), written whole, and a broken file set aside with a warning rather than stopping
the node."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ringlet.shared.instances import InstanceType
from ringlet.shared.saved import SavedInstance, SavedInstances


def saved(instance_id: str, model: str = "SmolLM2-135M-Instruct") -> SavedInstance:
    return SavedInstance(instance_id=instance_id, model=model, instance_type=InstanceType.CPU_RING)


def test_instances_are_added_and_removed_by_id(tmp_path: Path) -> None:
    store = SavedInstances(tmp_path / "home" / "instances.json")
    assert store.load() == []
    store.add(saved("inst-1"))
    store.add(saved("inst-2", "/models/other"))
    store.remove("inst-1")
    store.remove("inst-9")  # not there: nothing happens
    assert SavedInstances(store.path).load() == [saved("inst-2", "/models/other")]
    assert not list(store.path.parent.glob("*.partial"))


def test_an_instance_placed_again_is_kept_under_its_new_id(tmp_path: Path) -> None:
    store = SavedInstances(tmp_path / "instances.json")
    store.add(saved("inst-1"))
    store.add(saved("inst-2", "/models/other"))
    store.remove("inst-1", replaced_by="inst-7")
    assert store.load() == [saved("inst-7"), saved("inst-2", "/models/other")]


def test_a_broken_file_is_set_aside_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SavedInstances(tmp_path / "instances.json")
    store.path.write_text('[{"instance_id": "inst-1", "model": 3')
    with caplog.at_level(logging.WARNING):
        assert store.load() == []
    assert "cannot be read" in caplog.text and (tmp_path / "instances.json.bad").exists()
    store.add(saved("inst-2"))
    assert store.load() == [saved("inst-2")]


def test_an_ipex_ring_is_kept_with_its_devices_and_optimisation_level(tmp_path: Path) -> None:
    store = SavedInstances(tmp_path / "instances.json")
    ipex = SavedInstance(instance_id="inst-1", model="m", instance_type=InstanceType.IPEX_RING,
                         intel_gpu_devices=(1, 2), ipex_optimization_level="compile")
    store.add(ipex)
    assert SavedInstances(store.path).load() == [ipex]


def test_a_tensor_parallel_instance_is_kept_with_its_degree(tmp_path: Path) -> None:
    store = SavedInstances(tmp_path / "instances.json")
    split = SavedInstance(instance_id="inst-1", model="m", instance_type=InstanceType.CUDA_RING, tensor_parallel=2)
    store.add(split)
    assert SavedInstances(store.path).load() == [split]
    assert SavedInstances(store.path).load()[0].tensor_parallel == 2
