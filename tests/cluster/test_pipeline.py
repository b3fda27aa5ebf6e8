"""The data plane alone, without nodes: a model split over 3 stage processes (first, middle, last) gives exactly the
single-stage greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ringlet.master.placement import split_layers
from ringlet.shared.instances import BoundInstance, Instance, InstanceType, Shard
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.engine import TorchEngine
from ringlet.worker.pipeline import backend_for

PROMPT = "The capital of France is"
MAX_TOKENS = 12
HELPER = str(Path(__file__).with_name("stage_process.py"))


@pytest.fixture(scope="module")
def single_stage_tokens() -> list[int | None]:
    engine = TorchEngine.load(None, precision="fp32")
    task = TextGenerationTask(prompt=PROMPT, max_tokens=MAX_TOKENS, sampling=SamplingParams(temperature=0))
    return [c.token_id for c in engine.generate(task)]


def ring(stages: int, num_layers: int = 30) -> Instance:
    shards = [Shard(node_id=f"node-{rank}", rank=rank, start=start, end=end, num_layers=num_layers)
              for rank, (start, end) in enumerate(split_layers(num_layers, [1.0] * stages))]
    return Instance(instance_id=f"inst-ring{stages}", model="SmolLM2-135M-Instruct", instance_type="CpuRing",
                    shards=shards)


def run_ring(instance: Instance) -> list[dict]:
    bound = [BoundInstance(instance=instance, node_id=s.node_id).model_dump_json() for s in instance.shards]
    first = subprocess.Popen([sys.executable, HELPER, bound[0], "host", PROMPT, str(MAX_TOKENS)],
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    address = first.stdout.readline().strip()
    others = [subprocess.Popen([sys.executable, HELPER, b, address]) for b in bound[1:]]
    try:
        out, _ = first.communicate(timeout=120)
        for p in others:
            assert p.wait(timeout=30) == 0
    finally:
        for p in [first, *others]:
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0
    return [json.loads(line) for line in out.splitlines()]


def test_backends_follow_instance_type() -> None:
    assert backend_for(InstanceType.CPU_RING, {"cpu"}) == "gloo"
    assert backend_for(InstanceType.CUDA_RING, {"cuda"}) == "nccl"
    assert backend_for(InstanceType.CUDA_RING, {"cuda", "mlx"}) == "gloo"


@pytest.mark.slow
def test_three_stage_ring_gives_single_stage_tokens(single_stage_tokens: list[int | None]) -> None:
    # two stages are covered through real nodes in test_split_model
    chunks = run_ring(ring(3))
    assert [c["token_id"] for c in chunks] == single_stage_tokens
    assert len([c for c in chunks if c["token_id"] is not None]) >= 3
