"""The data plane alone, without nodes: a model split over stage processes (first, middle, last) gives exactly the
single-stage greedy tokens, whether every stage runs torch or one of them runs MLX (a mixed ring), and the same
seeded samples with penalties (the last stage samples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ringlet.master.placement import split_layers
from ringlet.net.ring import MLX_RING_BACKEND, backend_for
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, EngineType, Instance, InstanceType, Shard
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.engine import TorchEngine

# the second prompt starts with the first: its request reuses the cached prefix, so every stage trims its cache
PROMPTS = ["The capital of France is", "The capital of France is a city", "Water boils at"]
MAX_TOKENS = 12
# one stage per process, run as a module so that the tests package imports as it does here
STAGE = [sys.executable, "-m", "tests.support.stage_process"]
REPO = Path(__file__).resolve().parents[2]


GREEDY = SamplingParams(temperature=0)
# every part of the sampler that keeps state across steps: the seeded draw and the penalties' token history
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.3, presence_penalty=0.4,
                        frequency_penalty=0.2)


@pytest.fixture(scope="module")
def single_stage_engine() -> TorchEngine:
    return TorchEngine.load(None, config=EngineConfig(precision="fp32"))


def single_stage_run(engine: TorchEngine, sampling: SamplingParams) -> list[list[int | None]]:
    return [[c.token_id for c in engine.generate(TextGenerationTask(prompt=prompt, max_tokens=MAX_TOKENS,
                                                                     sampling=sampling))] for prompt in PROMPTS]


@pytest.fixture(scope="module")
def single_stage_tokens(single_stage_engine: TorchEngine) -> list[list[int | None]]:
    return single_stage_run(single_stage_engine, GREEDY)


def ring(engines: list[EngineType], num_layers: int = 30) -> Instance:
    shards = [Shard(node_id=f"node-{rank}", rank=rank, start=start, end=end, num_layers=num_layers, engine=engine)
              for rank, (engine, (start, end)) in enumerate(zip(engines, split_layers(num_layers, [1.0] * len(engines))))]
    instance_type = {frozenset({"cpu"}): InstanceType.CPU_RING,
                     frozenset({"mlx"}): InstanceType.MLX_RING}.get(frozenset(engines), InstanceType.MIXED_RING)
    return Instance(instance_id=f"inst-{'-'.join(engines)}", model="SmolLM2-135M-Instruct",
                    instance_type=instance_type, shards=shards)


def run_ring(instance: Instance, sampling: SamplingParams = GREEDY) -> list[list[dict]]:
    """The chunks of each prompt's request, run by the ring's stage processes."""
    bound = [BoundInstance(instance=instance, node_id=s.node_id).model_dump_json() for s in instance.shards]
    first = subprocess.Popen([*STAGE, bound[0], "host", json.dumps(PROMPTS), str(MAX_TOKENS),
                              sampling.model_dump_json()], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert first.stdout is not None
    address = first.stdout.readline().strip()
    others = [subprocess.Popen([*STAGE, b, address], cwd=REPO) for b in bound[1:]]
    try:
        out, _ = first.communicate(timeout=240)
        for p in others:
            assert p.wait(timeout=30) == 0
    finally:
        for p in [first, *others]:
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0
    chunks = [json.loads(line) for line in out.splitlines()]
    return [[c for c in chunks if c["request"] == i] for i in range(len(PROMPTS))]


def token_ids(requests: list[list[dict]]) -> list[list[int | None]]:
    return [[c["token_id"] for c in chunks] for chunks in requests]


def test_backends_follow_instance_type() -> None:
    assert backend_for(InstanceType.CPU_RING, {"cpu"}) == "gloo"
    assert backend_for(InstanceType.CUDA_RING, {"cuda"}) == "nccl"
    assert backend_for(InstanceType.CUDA_RING, {"cuda", "mlx"}) == "gloo"
    assert backend_for(InstanceType.MIXED_RING, {"cpu", "mlx"}) == "gloo"
    assert backend_for(InstanceType.MIXED_RING, {"cuda"}) == "gloo"  # host tensors, whatever the stages run
    assert backend_for(InstanceType.MLX_RING, {"mlx"}) == MLX_RING_BACKEND


@pytest.mark.slow
def test_three_stage_ring_gives_single_stage_tokens(single_stage_tokens: list[list[int | None]]) -> None:
    # two stages are covered through real nodes in test_split_model
    requests = run_ring(ring(["cpu", "cpu", "cpu"]))
    assert token_ids(requests) == single_stage_tokens
    assert len([c for c in requests[0] if c["token_id"] is not None]) >= 3


@pytest.mark.slow
def test_last_stage_samples_as_a_single_stage_does(single_stage_engine: TorchEngine) -> None:
    expected = single_stage_run(single_stage_engine, SEEDED)
    assert expected != single_stage_run(single_stage_engine, GREEDY)  # the parameters change what is drawn
    assert token_ids(run_ring(ring(["cpu", "cpu"]), SEEDED)) == expected


@pytest.mark.slow
@pytest.mark.parametrize("engines", [["mlx", "cpu"], ["cpu", "mlx"], ["cpu", "mlx", "cpu"]],
                         ids=["mlx-first", "mlx-last", "mlx-middle"])
def test_mixed_ring_with_an_mlx_stage_gives_single_stage_tokens(
        engines: list[EngineType], single_stage_tokens: list[list[int | None]]) -> None:
    pytest.importorskip("mlx_lm")
    requests = run_ring(ring(engines))
    assert token_ids(requests) == single_stage_tokens
    assert all(len([c for c in chunks if c["token_id"] is not None]) >= 3 for chunks in requests)


@pytest.mark.slow
def test_mlx_ring_over_mlx_distributed_gives_single_stage_tokens(
        single_stage_tokens: list[list[int | None]]) -> None:
    pytest.importorskip("mlx_lm")
    requests = run_ring(ring(["mlx", "mlx", "mlx"]))  # mlx.distributed's ring backend, three hops a token
    assert token_ids(requests) == single_stage_tokens
