"""The data plane alone, without nodes: a model split over stage processes (first, middle, last) gives exactly the
single-stage tokens. A ring of torch stages batches: its requests join at different steps, prompts go in chunks,
several steps are in flight round the ring (micro-batches), a small cache preempts, a cancel ends one request; each
request still gets its single-stage tokens, greedy or seeded with penalties (the last stage samples). A ring with
an MLX stage (a mixed ring, or MLX over mlx.distributed) runs its requests one after another. The last stage sends
back the log-probabilities a request asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringlet.master.placement import split_layers
from ringlet.models.paged_cache import SequenceStep
from ringlet.net.ring import MLX_RING_BACKEND, backend_for
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, EngineType, Instance, InstanceType, Shard
from ringlet.shared.tasks import Constraint, GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.pipeline import decode_steps, encode_steps
from ringlet.worker.supervisor import runner_environment
from tests.support.stage_process import Job

# the second prompt starts with the first: its request reuses the cached prefix
PROMPTS = ["The capital of France is", "The capital of France is a city", "Water boils at"]
MAX_TOKENS = 12
# one stage per process, run as a module so that the tests package imports as it does here
STAGE = [sys.executable, "-m", "tests.support.stage_process"]
REPO = Path(__file__).resolve().parents[2]
FP32 = EngineConfig(precision="fp32", kv_cache_tokens=16384)  # two 8k contexts, not a share of the memory

GREEDY = SamplingParams(temperature=0)
# every part of the sampler that keeps state across steps: the seeded draw and the penalties' token history
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.3, presence_penalty=0.4,
                        frequency_penalty=0.2)
WITH_LOGPROBS = SEEDED.model_copy(update={"logprobs": 3})


@pytest.fixture(scope="module")
def single_stage_engine() -> TorchBatchEngine:
    return TorchBatchEngine.load(None, config=FP32)


def single_stage_chunks(engine: TorchBatchEngine, sampling: SamplingParams,
                        max_tokens: int = MAX_TOKENS) -> list[list[GenerationChunk]]:
    """Each prompt's chunks, its request alone on one stage."""
    return [list(engine.generate(TextGenerationTask(prompt=prompt, max_tokens=max_tokens, sampling=sampling)))
            for prompt in PROMPTS]


def single_stage_run(engine: TorchBatchEngine, sampling: SamplingParams,
                     max_tokens: int = MAX_TOKENS) -> list[list[int | None]]:
    """Each prompt's tokens, its request alone on one stage."""
    return [[c.token_id for c in chunks] for chunks in single_stage_chunks(engine, sampling, max_tokens)]


def logprobs_of(requests: list[list[dict]]) -> list[list[tuple[str, float, list[str]]]]:
    """Each request's tokens' (text, log-probability, the most likely tokens' texts)."""
    return [[(t["token"], t["logprob"], [o["token"] for o in t["top"]]) for c in chunks for t in c["logprobs"]]
            for chunks in requests]


def assert_same_logprobs(ring_run: list[list[dict]], single: list[list[GenerationChunk]]) -> None:
    expected = logprobs_of([[{"logprobs": [t.model_dump() for t in c.logprobs or ()]} for c in chunks]
                            for chunks in single])
    got = logprobs_of(ring_run)
    assert all(len(tokens) >= 3 for tokens in got)
    assert [[(text, top) for text, _, top in tokens] for tokens in got] == \
        [[(text, top) for text, _, top in tokens] for tokens in expected]
    assert [value for tokens in got for _, value, _ in tokens] == pytest.approx(
        [value for tokens in expected for _, value, _ in tokens], abs=1e-3)


@pytest.fixture(scope="module")
def single_stage_tokens(single_stage_engine: TorchBatchEngine) -> list[list[int | None]]:
    return single_stage_run(single_stage_engine, GREEDY)


def ring(engines: list[EngineType], num_layers: int = 30) -> Instance:
    shards = [Shard(node_id=f"node-{rank}", rank=rank, start=start, end=end, num_layers=num_layers, engine=engine)
              for rank, (engine, (start, end)) in enumerate(zip(engines, split_layers(num_layers, [1.0] * len(engines))))]
    instance_type = {frozenset({"cpu"}): InstanceType.CPU_RING,
                     frozenset({"mlx"}): InstanceType.MLX_RING}.get(frozenset(engines), InstanceType.MIXED_RING)
    return Instance(instance_id=f"inst-{'-'.join(engines)}", model="SmolLM2-135M-Instruct",
                    instance_type=instance_type, shards=shards)


def run_ring(instance: Instance, job: Job | None = None, config: EngineConfig = FP32,
             summary: dict | None = None) -> list[list[dict]]:
    """The chunks of each prompt's request, run by the ring's stage processes (a batched run's preemptions and
    most steps in flight into `summary`)."""
    job = job or Job(prompts=PROMPTS, max_tokens=MAX_TOKENS)
    bound = [BoundInstance(instance=instance, node_id=s.node_id) for s in instance.shards]
    env = runner_environment(bound[0], os.environ)  # as a node starts a ring's runners
    first = subprocess.Popen([*STAGE, bound[0].model_dump_json(), "host", config.model_dump_json(),
                              job.model_dump_json()], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    others = [subprocess.Popen([*STAGE, b.model_dump_json(), "join", config.model_dump_json()], stdin=subprocess.PIPE,
                               text=True, cwd=REPO, env=env) for b in bound[1:]]
    try:
        assert first.stdout is not None
        address = first.stdout.readline()
        for p in others:
            assert p.stdin is not None
            p.stdin.write(address)
            p.stdin.close()
        out, _ = first.communicate(timeout=240)
        for p in others:
            assert p.wait(timeout=30) == 0
    finally:
        for p in [first, *others]:
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0
    chunks = [json.loads(line) for line in out.splitlines()]
    if summary is not None:
        summary.update(*(c for c in chunks if c["request"] is None))
    return [[c for c in chunks if c["request"] == i] for i in range(len(job.prompts))]


def token_ids(requests: list[list[dict]]) -> list[list[int | None]]:
    return [[c["token_id"] for c in chunks] for chunks in requests]


def test_step_layout_round_trips() -> None:
    steps = [SequenceStep(40, 1, [3, 0, 7]), SequenceStep(0, 16, [5], wants_logits=False), SequenceStep(16, 9, [5, 2])]
    assert decode_steps(encode_steps(steps, [11, 12, 13])) == (steps, [11, 12, 13])


def test_backends_follow_instance_type() -> None:
    assert backend_for(InstanceType.CPU_RING, {"cpu"}) == "gloo"
    assert backend_for(InstanceType.CUDA_RING, {"cuda"}) == "nccl"
    assert backend_for(InstanceType.CUDA_RING, {"cuda", "mlx"}) == "gloo"
    assert backend_for(InstanceType.MIXED_RING, {"cpu", "mlx"}) == "gloo"
    assert backend_for(InstanceType.MIXED_RING, {"cuda"}) == "gloo"  # host tensors, whatever the stages run
    assert backend_for(InstanceType.MLX_RING, {"mlx"}) == MLX_RING_BACKEND


@pytest.mark.slow
def test_three_stage_ring_batches_and_gives_single_stage_tokens(single_stage_tokens: list[list[int | None]]) -> None:
    # requests join one step apart, prompts go four tokens a step: three steps in flight round the ring, with
    # prompt chunks and decodes of other requests in the same steps
    summary: dict = {}
    requests = run_ring(ring(["cpu", "cpu", "cpu"]), Job(prompts=PROMPTS, max_tokens=MAX_TOKENS, stagger=1,
                                                          step_tokens=4), summary=summary)
    assert token_ids(requests) == single_stage_tokens
    assert summary["most_in_flight"] == 3
    assert len([c for c in requests[0] if c["token_id"] is not None]) >= 3


@pytest.mark.slow
def test_two_stage_ring_preempts_and_cancels_without_changing_tokens(single_stage_engine: TorchBatchEngine) -> None:
    # five blocks of 16 positions: three requests growing to 44-48 positions (three blocks each) cannot all stay, so
    # some are preempted and computed again later; the third is cancelled early, maybe with its step in flight
    expected = single_stage_run(single_stage_engine, GREEDY, max_tokens=40)
    config = FP32.model_copy(update={"kv_cache_tokens": 80})
    summary: dict = {}
    requests = token_ids(run_ring(ring(["cpu", "cpu"]), Job(prompts=[*PROMPTS, PROMPTS[2]], max_tokens=40,
                                                            stagger=0, cancel={3: 6}), config, summary))
    assert summary["preemptions"] > 0 and summary["most_in_flight"] == 2
    assert requests[:3] == expected
    cancelled = requests[3]
    assert cancelled == expected[2][:len(cancelled)] and len(cancelled) < len(expected[2])


@pytest.mark.slow
def test_last_stage_samples_as_a_single_stage_does_with_its_logprobs(single_stage_engine: TorchBatchEngine) -> None:
    single = single_stage_chunks(single_stage_engine, WITH_LOGPROBS)
    expected = [[c.token_id for c in chunks] for chunks in single]
    assert expected != single_stage_run(single_stage_engine, GREEDY)  # the parameters change what is drawn
    requests = run_ring(ring(["cpu", "cpu"]), Job(prompts=PROMPTS, max_tokens=MAX_TOKENS, sampling=WITH_LOGPROBS))
    assert token_ids(requests) == expected
    assert_same_logprobs(requests, single)


@pytest.mark.slow
def test_a_grammar_failing_on_the_last_stage_ends_that_answer_with_an_error() -> None:
    failing = GREEDY.model_copy(update={"constraint": Constraint(kind="regex", spec="(a{1000}){1000}")})
    requests = run_ring(ring(["cpu", "cpu"]), Job(prompts=PROMPTS[:1], max_tokens=8, sampling=failing))
    assert [c["finish_reason"] for c in requests[0] if c["finish_reason"]] == ["error"]


@pytest.mark.slow
def test_a_mixed_rings_last_stage_sends_back_logprobs(single_stage_engine: TorchBatchEngine) -> None:
    pytest.importorskip("mlx_lm")
    greedy = GREEDY.model_copy(update={"logprobs": 2})
    requests = run_ring(ring(["cpu", "mlx"]), Job(prompts=PROMPTS[:1], max_tokens=6, sampling=greedy))
    single = single_stage_chunks(single_stage_engine, greedy, max_tokens=6)[:1]
    assert token_ids(requests) == [[c.token_id for c in chunks] for chunks in single]
    got = logprobs_of(requests)[0]
    assert [text for text, _, _ in got] == [t.token for c in single[0] for t in c.logprobs or ()]
    assert all(top[0] == text for text, _, top in got), "a greedy token is the most likely"


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


@pytest.mark.slow
def test_a_ring_holds_a_constrained_request_to_its_grammar(single_stage_engine: TorchBatchEngine) -> None:
    """The last stage samples under the request's grammar as a single stage does."""
    schema = {"type": "object", "properties": {"answer": {"enum": ["Paris", "Lyon", "Nice"]},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    constrained = SEEDED.model_copy(update={"constraint": Constraint(kind="json_schema", spec=json.dumps(schema))})
    expected = single_stage_run(single_stage_engine, constrained, max_tokens=30)
    assert token_ids(run_ring(ring(["cpu", "cpu"]), Job(prompts=PROMPTS, max_tokens=30, sampling=constrained))) == expected
    tokenizer = single_stage_engine.tokenizer
    for tokens in expected:
        text = tokenizer.decode([t for t in tokens if t is not None and t not in tokenizer.eos_token_ids])
        assert json.loads(text)["answer"] in ("Paris", "Lyon", "Nice")
