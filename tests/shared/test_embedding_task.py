"""An embeddings request travels the same pipes as a generation (node -> runner, node -> node) and comes back as the
same chunks: each task kind decodes as itself, and a task of neither kind is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ringlet.shared.messages import STREAM_ITEM, TASK_REQUEST, TO_RUNNER, Chunk, RunTask, TaskRequest
from ringlet.shared.tasks import EmbeddingTask, GenerationChunk, TextGenerationTask, Usage
from ringlet.shared.wire import BadMessageError, decode, encode

EMBEDDING = EmbeddingTask(task_id="t1", model="m", inputs=["a text", [1, 2, 3]], truncate=False, dimensions=32)
GENERATION = TextGenerationTask(task_id="t2", model="m", prompt="Hello", max_tokens=2)


@pytest.mark.parametrize("task", [EMBEDDING, GENERATION], ids=["embedding", "generation"])
def test_each_task_kind_decodes_as_itself(task: EmbeddingTask | TextGenerationTask) -> None:
    run = decode(TO_RUNNER, encode(RunTask(task=task)), "test")
    assert isinstance(run, RunTask) and run.task == task and type(run.task) is type(task)
    forwarded = decode(TASK_REQUEST, encode(TaskRequest(origin="n1", instance_id="i1", task=task)), "test")
    assert forwarded.task == task and type(forwarded.task) is type(task)


def test_embeddings_come_back_as_floats_exactly() -> None:
    vectors = [[0.1, -2.5e-8, 3.0], [1 / 3, 0.0, -1.0]]
    chunk = GenerationChunk(task_id="t1", embeddings=vectors, last=True, finish_reason="stop",
                            usage=Usage(prompt_tokens=5, completion_tokens=0))
    back = decode(STREAM_ITEM, encode(Chunk(chunk=chunk)), "test")
    assert isinstance(back, Chunk) and back.chunk.embeddings == vectors


def test_a_task_of_neither_kind_is_refused() -> None:
    mixed = b'{"type": "run_task", "task": {"model": "m", "prompt": "x", "inputs": ["y"]}}'
    with pytest.raises(BadMessageError):
        decode(TO_RUNNER, mixed, "test")


@pytest.mark.parametrize("inputs", [[], [[-1]]], ids=["no inputs", "negative token id"])
def test_an_embedding_task_refuses_bad_inputs(inputs: list[object]) -> None:
    with pytest.raises(ValidationError):
        EmbeddingTask(model="m", inputs=inputs)
