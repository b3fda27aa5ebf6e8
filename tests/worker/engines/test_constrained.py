"""Constrained output on each engine's own path with the embedded model: the one-request generator (`TextGenerator`,
which the cpu, cuda, ipex and mlx engines share) and the MLX batch (mlx-lm's sampler with ringlet's grammar as a
logits processor). The node's batching path is tested through the API in tests/node/test_live_api.py."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import Constraint, SamplingParams, TextGenerationTask
from ringlet.worker.engines.engine_init import initialize_engine, local_instance

SCHEMA = {"type": "object",
          "properties": {"city": {"enum": ["Paris", "Lyon"]},
                         "population": {"type": "integer", "minimum": 0, "maximum": 99_999_999},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2}},
          "required": ["city", "population"], "additionalProperties": False}
CHOICES = ["Paris", "Rome", "Madrid"]
PROMPT = "What is the capital of France? Answer in JSON."


def tasks() -> list[TextGenerationTask]:
    schema = Constraint(kind="json_schema", spec=json.dumps(SCHEMA))
    choice = Constraint(kind="choice", spec=json.dumps(CHOICES))
    return [TextGenerationTask(task_id="schema", prompt=PROMPT, max_tokens=80,
                               sampling=SamplingParams(temperature=0, constraint=schema)),
            TextGenerationTask(task_id="sampled", prompt=PROMPT, max_tokens=80,
                               sampling=SamplingParams(temperature=0.9, seed=5, constraint=schema)),
            TextGenerationTask(task_id="choice", prompt="The capital of France is", max_tokens=8, n=2,
                               sampling=SamplingParams(temperature=1.0, seed=1, constraint=choice))]


def check(texts: dict[str, dict[int, str]]) -> None:
    for task_id in ("schema", "sampled"):
        jsonschema_rs.validate(SCHEMA, json.loads(texts[task_id][0]))
    assert set(texts["choice"]) == {0, 1} and all(text in CHOICES for text in texts["choice"].values())


def texts_of(chunks) -> dict[int, str]:  # type: ignore[no-untyped-def]
    by_choice: dict[int, str] = {}
    for chunk in chunks:
        by_choice[chunk.choice] = by_choice.get(chunk.choice, "") + chunk.text
        assert chunk.finish_reason in (None, "stop"), "the grammar ends each answer before its token limit"
    return by_choice


@pytest.mark.parametrize("engine_type", ["cpu", pytest.param("mlx", marks=pytest.mark.slow)])
def test_the_one_request_generator_holds_answers_to_their_constraint(engine_type):
    if engine_type == "mlx":
        pytest.importorskip("mlx_lm", reason="the mlx engine needs mlx, mlx-cpu and mlx-lm (pip install them)")
    engine = initialize_engine(local_instance(None, engine_type), EngineConfig(precision="fp32", kv_cache_tokens=16384))
    check({task.task_id: texts_of(engine.generate(task)) for task in tasks()})


@pytest.mark.slow
def test_the_mlx_batch_holds_answers_to_their_constraint():
    pytest.importorskip("mlx_lm", reason="the mlx engine needs mlx, mlx-cpu and mlx-lm (pip install them)")
    engine = initialize_engine(local_instance(None, "mlx"), EngineConfig(precision="fp32"))
    generator = engine.batch_generator(8)
    for task in tasks():
        generator.submit(task)
    chunks: dict[str, list] = {task.task_id: [] for task in tasks()}
    while generator:
        for chunk in generator.step():
            chunks[chunk.task_id].append(chunk)
    check({task_id: texts_of(task_chunks) for task_id, task_chunks in chunks.items()})


@pytest.mark.parametrize("path", ["cpu", pytest.param("mlx", marks=pytest.mark.slow),
                                  pytest.param("mlx batch", marks=pytest.mark.slow)])
def test_logprobs_come_out_with_the_tokens_on_each_path(path):
    if path.startswith("mlx"):
        pytest.importorskip("mlx_lm", reason="the mlx engine needs mlx, mlx-cpu and mlx-lm (pip install them)")
    engine = initialize_engine(local_instance(None, path.split()[0]), EngineConfig(precision="fp32", kv_cache_tokens=16384))
    task = TextGenerationTask(task_id="t", prompt="The capital of France is", max_tokens=8, ignore_eos=True,
                              sampling=SamplingParams(temperature=0, logprobs=3))
    if path == "mlx batch":
        generator = engine.batch_generator(8)
        generator.submit(task)
        chunks = []
        while generator:
            chunks += generator.step()
    else:
        chunks = list(engine.generate(task))
    logprobs = [t for c in chunks for t in c.logprobs or []]
    assert len(logprobs) == 8 and "".join(t.token for t in logprobs) == "".join(c.text for c in chunks)
    assert all(len(t.top) == 3 and t.logprob == pytest.approx(t.top[0].logprob, abs=1e-5) for t in logprobs)
