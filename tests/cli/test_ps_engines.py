"""`ringlet ps` shows what each instance runs on, its fallback, an IpexRing's options and what was applied."""

from __future__ import annotations

import pytest

from ringlet.cli import CliError
from ringlet.cli.node import instance_options
from ringlet.cli.ps import format_state, idle_cell, processor_cell, until_cell
from ringlet.master.placement import InstanceOptions
from ringlet.shared.instances import DeviceLayers, Instance, InstanceType, Shard
from ringlet.shared.state import (
    InstanceCreated,
    LayerLoad,
    NodeJoined,
    RunnerFellBack,
    RunnerProgressed,
    RunnerReady,
    State,
    apply,
)
from tests.support.node_infos import intel_gpu_node

OPTIMIZATION = "ipex.optimize (bf16): 211 of 211 linear layers prepacked"


def state_of(ipex_fell_back: bool, devices: tuple[DeviceLayers, ...] = ()) -> dict[str, object]:
    state = apply(State(), NodeJoined(node=intel_gpu_node("node-arc", 32, 16)))
    instance = Instance(instance_id="inst-x", model="m", instance_type=InstanceType.IPEX_RING,
                        shards=[Shard(node_id="node-arc", rank=0, start=0, end=30, num_layers=30, engine="ipex",
                                      devices=devices)],
                        intel_gpu_devices=(0,), ipex_optimization_level="ipex")
    state = apply(state, InstanceCreated(instance=instance, created_at=0.0))
    state = apply(state, RunnerReady(instance_id="inst-x", node_id="node-arc", context_length=4096, engine="ipex",
                                     optimization=OPTIMIZATION))
    if ipex_fell_back:
        state = apply(state, RunnerFellBack(instance_id="inst-x", node_id="node-arc", engine="cpu",
                                            reason="ipex -> cpu: device lost"))
    return {**state.model_dump(mode="json"), "tasks": {}}


def test_ps_shows_the_engine_and_the_settings() -> None:
    lines = format_state(state_of(ipex_fell_back=False)).splitlines()
    assert lines[0].split() == ["INSTANCE", "MODEL", "TYPE", "STATUS", "TASKS", "IDLE", "UNTIL", "SIZE", "PROCESSOR",
                                "CONTEXT", "ENGINE", "STAGES"]
    assert lines[1].split() == ["inst-x", "m", "IpexRing", "ready", "0", "-", "forever", "-", "100%", "GPU", "4096",
                                "ipex", "node-arc[0:30]"]
    settings = lines[lines.index("settings and optimisations:") + 1:]
    assert settings == ["inst-x: Intel GPUs 0, optimisation level ipex", f"inst-x on node-arc: {OPTIMIZATION}"]


def test_ps_shows_a_fallback_in_the_engine_column() -> None:
    lines = format_state(state_of(ipex_fell_back=True)).splitlines()
    assert "  cpu (ipex -> cpu: device lost)  node-arc[0:30]" in lines[1] and "100% CPU" in lines[1]


def test_the_processor_is_the_share_of_memory_on_gpu_engines_and_idle_counts_from_the_last_request() -> None:
    shards = [{"node_id": "mac", "engine": "mlx"}, {"node_id": "pc", "engine": "cuda"}]
    record = {"instance": {"shards": shards}, "runners": {"pc": {"engine": "cpu"}},  # pc fell back to its CPU
              "memory_bytes": {"mac": 3 * 2**30, "pc": 1 * 2**30}}
    assert processor_cell(record) == "25%/75% CPU/GPU"
    assert processor_cell({**record, "memory_bytes": {}}) == "50%/50% CPU/GPU"  # no sizes: stages alike
    assert processor_cell({**record, "runners": {}}) == "100% GPU"
    assert idle_cell({"last_request_at": 1000.0}, 0, now=1125.0) == "2m"
    assert idle_cell({"last_request_at": 1000.0}, 2, now=1125.0) == "busy" and idle_cell({}, 0, 5.0) == "-"
    assert until_cell({"expires_at": 1000.0 + 7500}, now=1000.0) == "2h5m" and until_cell({}, 0.0) == "forever"


def test_ps_shows_the_layers_of_each_gpu_a_stage_is_split_over() -> None:
    split = (DeviceLayers(device=0, start=0, end=12), DeviceLayers(device=1, start=12, end=30))
    lines = format_state(state_of(ipex_fell_back=False, devices=split)).splitlines()
    assert lines[1].split()[-3:] == ["node-arc[0:30]", "xpu:0[0:12]", "xpu:1[12:30]"]


def test_the_node_commands_intel_options_are_checked() -> None:
    assert instance_options("1,0", "eager") == InstanceOptions(intel_gpu_devices=(1, 0),
                                                               ipex_optimization_level="eager")
    assert instance_options(None, "auto") == InstanceOptions()
    with pytest.raises(CliError, match="write device indexes separated by commas"):
        instance_options("0;1", "auto")
    with pytest.raises(CliError, match="distinct device indexes"):
        instance_options("1,1", "auto")
    assert instance_options(None, "auto", 32768) == InstanceOptions(max_context=32768)
    with pytest.raises(CliError, match="--max-context"):
        instance_options(None, "auto", 4)


def test_ps_shows_a_loading_stage_as_a_bar_of_layers_and_bytes() -> None:
    state = apply(State(), NodeJoined(node=intel_gpu_node("node-arc", 32, 16)))
    instance = Instance(instance_id="inst-l", model="m", instance_type=InstanceType.CPU_RING,
                        shards=[Shard(node_id="node-arc", rank=0, start=0, end=30, num_layers=30, engine="cpu")])
    state = apply(state, InstanceCreated(instance=instance, created_at=0.0))
    state = apply(state, RunnerProgressed(instance_id="inst-l", node_id="node-arc", progress=0.3, detail="loading"))
    [row] = [line for line in format_state({**state.model_dump(mode="json"), "tasks": {}}).splitlines()
             if line.startswith("inst-l")]
    assert "loading 30%" in row  # no layer counts yet
    load = LayerLoad(layers_loaded=12, layers_total=30, bytes_loaded=450 * 2**20, bytes_total=int(1.1 * 2**30))
    state = apply(state, RunnerProgressed(instance_id="inst-l", node_id="node-arc", progress=0.37,
                                          detail="loaded 12 of 30 layers", load=load))
    [row] = [line for line in format_state({**state.model_dump(mode="json"), "tasks": {}}).splitlines()
             if line.startswith("inst-l")]
    assert "loading [####......] 12/30 layers, 0.44/1.1 GiB" in row and "warming" not in row
    done = load.model_copy(update={"layers_loaded": 30, "bytes_loaded": int(1.1 * 2**30)})
    state = apply(state, RunnerProgressed(instance_id="inst-l", node_id="node-arc", progress=0.85,
                                          detail="loaded 30 of 30 layers", load=done))
    state = apply(state, RunnerProgressed(instance_id="inst-l", node_id="node-arc", progress=0.9, detail="warming up"))
    [row] = [line for line in format_state({**state.model_dump(mode="json"), "tasks": {}}).splitlines()
             if line.startswith("inst-l")]
    assert "loading [##########] 30/30 layers, 1.1/1.1 GiB; warming up" in row, "a full bar says what comes next"


def test_ps_shows_how_many_gpus_each_stage_is_split_over() -> None:
    state = apply(State(), NodeJoined(node=intel_gpu_node("node-a", 32, 16)))
    instance = Instance(instance_id="inst-t", model="m", instance_type=InstanceType.CUDA_RING, tensor_parallel=4,
                        shards=[Shard(node_id="node-a", rank=0, start=0, end=30, num_layers=30, engine="cuda")])
    state = apply(state, InstanceCreated(instance=instance, created_at=0.0))
    lines = format_state({**state.model_dump(mode="json"), "tasks": {}}).splitlines()
    assert lines[1].split()[-2:] == ["node-a[0:30]", "x4"]


def test_the_node_commands_tensor_parallel_degree_is_checked() -> None:
    assert instance_options(None, "auto", tensor_parallel=2) == InstanceOptions(tensor_parallel=2)
    with pytest.raises(CliError, match="--tensor-parallel: Input should be greater than or equal to 1"):
        instance_options(None, "auto", tensor_parallel=0)

