"""The Ollama-compatible API through the official `ollama` client: /api/tags, /api/chat and /api/generate (whole or
as newline-delimited JSON), the options each request turns into for the node, and errors in Ollama's shape."""

from __future__ import annotations

import hashlib
import json

import httpx
import ollama
import pytest

from ringlet.models.embedded import EMBEDDED_MODEL_ID, embedded_model_path
from ringlet.shared.errors import TaskError
from ringlet.shared.tasks import ChatMessage, Constraint, SamplingParams
from tests.support.fake_node import REPLY, FakeNode, prompt_tokens

ANSWER = "".join(REPLY)
REPLY_TOKENS = len(REPLY) + 1  # and the end-of-sequence token
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=30)


def test_list_shows_what_is_on_disk_with_real_sizes_and_digests(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    embedded = models[f"{EMBEDDED_MODEL_ID}:latest"]
    path = embedded_model_path()
    assert embedded.size == path.stat().st_size and embedded.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert embedded.modified_at is not None and abs(embedded.modified_at.timestamp() - path.stat().st_mtime) < 1
    assert embedded.details and embedded.details.family == "llama" and embedded.details.format == "gguf"
    assert embedded.details.quantization_level == "Q4_1", "the file's own type, as Ollama names it"
    assert "Qwen/Qwen3-8B:latest" not in models, "the catalog's models are not listed until on disk"


def test_chat(client: ollama.Client, node: FakeNode) -> None:
    reply = client.chat(model=f"{EMBEDDED_MODEL_ID}:latest", options={"temperature": 0, "num_predict": 12},
                        messages=QUESTION)
    assert reply.message.content == ANSWER and reply.message.role == "assistant"
    assert reply.model == f"{EMBEDDED_MODEL_ID}:latest", "the model as the request named it, as Ollama does"
    (task,) = node.submitted
    assert task.messages == [ChatMessage(role="user", content="What is the capital of France?")]
    assert task.max_tokens == 12 and task.sampling.greedy
    assert reply.done and reply.done_reason == "stop"
    assert (reply.prompt_eval_count, reply.eval_count) == (prompt_tokens(task), REPLY_TOKENS)
    assert reply.total_duration and reply.prompt_eval_duration and reply.eval_duration


def test_chat_streams_lines(client: ollama.Client, node: FakeNode) -> None:
    parts = list(client.chat(model=EMBEDDED_MODEL_ID, stream=True, options={"num_predict": 3}, messages=QUESTION))
    assert len(parts) == 3 + 1 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == "The capital of"
    assert parts[-1].done_reason == "length" and parts[-1].message.content == ""
    assert (parts[-1].prompt_eval_count, parts[-1].eval_count) == (prompt_tokens(node.submitted[-1]), 3)


def test_the_stream_is_one_json_object_per_line(url: str) -> None:
    body = {"model": EMBEDDED_MODEL_ID, "messages": QUESTION, "options": {"stop": ["Paris"]}}
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=30) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-ndjson"
        text = reply.read().decode()
    assert text.endswith("\n") and "\n\n" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert all(line["message"]["content"] for line in lines[:-1]), "no line of empty text before the last"
    assert "".join(line["message"]["content"] for line in lines) == "The capital of France is "
    assert lines[-1]["done_reason"] == "stop" and 0 <= lines[-1]["load_duration"] < lines[-1]["total_duration"]
    assert all(line["created_at"].endswith("Z") and line["model"] == EMBEDDED_MODEL_ID for line in lines)


def test_generate(client: ollama.Client, node: FakeNode) -> None:
    reply = client.generate(model=EMBEDDED_MODEL_ID, prompt="What is the capital of France?",
                            system="Answer briefly.", options={"temperature": 0, "num_predict": 12})
    assert reply.response == ANSWER and reply.done and reply.done_reason == "stop"
    assert node.submitted[-1].messages == [ChatMessage(role="system", content="Answer briefly."),
                                           ChatMessage(role="user", content="What is the capital of France?")]
    raw = list(client.generate(model=EMBEDDED_MODEL_ID, prompt="1, 2, 3,", raw=True, stream=True,
                               options={"temperature": 0, "num_predict": 3}))
    assert node.submitted[-1].prompt == "1, 2, 3," and node.submitted[-1].messages is None
    assert raw[-1].done and raw[-1].eval_count == 3 and raw[-1].done_reason == "length"
    submitted = len(node.submitted)
    loaded = client.generate(model=EMBEDDED_MODEL_ID, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert len(node.submitted) == submitted, "an empty prompt only checks that the model is served"
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model="Qwen/Qwen3-0.6B", prompt="")
    assert error.value.status_code == 503 and "POST /instance" in str(error.value.error)


def test_options_reach_the_task(client: ollama.Client, node: FakeNode) -> None:
    client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={
        "temperature": 1.5, "top_p": 0.8, "top_k": 20, "min_p": 0.1, "seed": 7, "repeat_penalty": 1.2,
        "presence_penalty": 0.3, "frequency_penalty": 0.4, "stop": ["Rome"], "num_predict": 5, "num_ctx": 2048})
    task = node.submitted[-1]
    assert task.context_window == 2048
    assert task.sampling == SamplingParams(temperature=1.5, top_p=0.8, top_k=20, min_p=0.1, seed=7,
                                           repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.4,
                                           penalty_window=64), "Ollama's default repeat_last_n"
    for last_n, window in ((16, 16), (-1, None)):
        client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"repeat_penalty": 1.2,
                                                                         "repeat_last_n": last_n})
        assert node.submitted[-1].sampling.penalty_window == window
    client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"repeat_penalty": 1.2, "repeat_last_n": 0})
    assert node.submitted[-1].sampling == SamplingParams(temperature=0.8), "0: no penalties"
    assert task.stop == ["Rome"] and task.max_tokens == 5
    client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_predict": -1})
    assert node.submitted[-1].max_tokens is None, "-1: until the model stops"
    assert node.submitted[-1].sampling == SamplingParams(temperature=0.8), "Ollama's default temperature"


def test_unknown_model_is_a_response_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404 and "no-such-model" in str(error.value.error)
    assert EMBEDDED_MODEL_ID in str(error.value.error), "the message lists the models"


def test_errors_have_ollama_shape(url: str, node: FakeNode) -> None:
    invalid = httpx.post(url + "/api/chat", json={"model": EMBEDDED_MODEL_ID, "messages": QUESTION,
                                                  "options": {"temperature": -1}})
    assert invalid.status_code == 400 and "temperature" in invalid.json()["error"]
    long_prompt = "hello " * (node.context_window + 10)
    too_long = httpx.post(url + "/api/generate", json={"model": EMBEDDED_MODEL_ID, "prompt": long_prompt})
    assert too_long.status_code == 400 and "context window" in too_long.json()["error"]

    node.script = lambda: ["The", TaskError("runner_failed", "the runner of the instance exited with -9")]
    with httpx.stream("POST", url + "/api/chat", json={"model": EMBEDDED_MODEL_ID, "messages": QUESTION},
                      timeout=30) as reply:
        assert reply.status_code == 200
        lines = [json.loads(line) for line in reply.iter_lines()]
    assert lines[0]["message"]["content"] == "The" and not lines[0]["done"]
    assert lines[-1] == {"error": "the runner of the instance exited with -9"}
    whole = httpx.post(url + "/api/chat", json={"model": EMBEDDED_MODEL_ID, "messages": QUESTION, "stream": False})
    assert whole.status_code == 503 and whole.json() == {"error": "the runner of the instance exited with -9"}


def test_version_and_curl_style_bodies(url: str, node: FakeNode) -> None:
    assert httpx.get(url + "/api/version").json()["version"] == "0.6.0"
    # `curl -d` sends form encoding; Ollama reads the body as JSON anyway
    body = json.dumps({"model": EMBEDDED_MODEL_ID, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    reply = httpx.post(url + "/api/generate", content=body, timeout=30,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 200 and reply.json()["done"] is True and reply.json()["response"] == "The capital"
    assert node.submitted[-1].max_tokens == 2


def test_format_json_or_a_schema_becomes_the_tasks_constraint(client: ollama.Client, node: FakeNode) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, format="json", options={"num_predict": 2})
    assert node.submitted[-1].sampling.constraint == Constraint(kind="json_object")
    client.generate(model=EMBEDDED_MODEL_ID, prompt="Where?", format=schema, options={"num_predict": 2})
    assert node.submitted[-1].sampling.constraint == Constraint(kind="json_schema", spec=json.dumps(schema))
    client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_predict": 2})
    assert node.submitted[-1].sampling.constraint is None


def test_a_format_that_cannot_compile_is_a_bad_request(client: ollama.Client, node: FakeNode) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, format={"type": "sandwich"})
    assert error.value.status_code == 400 and "format" in error.value.error and "sandwich" in error.value.error
    assert node.submitted == []


def test_logprobs_come_with_each_token(client: ollama.Client, node: FakeNode) -> None:
    reply = client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, logprobs=True, top_logprobs=2,
                        options={"num_predict": 12})
    assert node.submitted[-1].sampling.logprobs == 2
    assert reply.logprobs is not None and "".join(t.token for t in reply.logprobs) == reply.message.content
    assert all(len(t.top_logprobs or []) == 2 for t in reply.logprobs)
    lines = list(client.generate(model=EMBEDDED_MODEL_ID, prompt="Hi", logprobs=True, stream=True,
                                 options={"num_predict": 12}))
    tokens = [t for line in lines for t in line.logprobs or []]
    assert "".join(t.token for t in tokens) == "".join(line.response for line in lines)
    assert all(t.top_logprobs is None for t in tokens)


@pytest.mark.parametrize(("keep_alive", "seconds"), [("10m", 600.0), ("1h30m", 5400.0), (45, 45.0), (-1, -1.0),
                                                     ("0", 0.0), (None, None)])
def test_keep_alive_reaches_the_node_once_the_answer_is_out(client: ollama.Client, node: FakeNode,
                                                            keep_alive: str | int | None,
                                                            seconds: float | None) -> None:
    for stream in (False, True):
        node.kept_alive.clear()
        reply = client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, keep_alive=keep_alive, stream=stream)
        if stream:
            assert "".join(line.message.content or "" for line in reply) == ANSWER  # type: ignore[union-attr]
        instance = node.instance_for(EMBEDDED_MODEL_ID).instance.instance_id
        assert node.kept_alive == [(instance, seconds)]


def test_an_empty_prompt_loads_and_with_keep_alive_0_unloads(client: ollama.Client, node: FakeNode) -> None:
    instance = node.instance_for(EMBEDDED_MODEL_ID).instance.instance_id
    assert client.generate(model=EMBEDDED_MODEL_ID, prompt="").done_reason == "load"
    assert client.generate(model=EMBEDDED_MODEL_ID, prompt="", keep_alive=0).done_reason == "unload"
    assert node.kept_alive == [(instance, None), (instance, 0.0)]
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model=EMBEDDED_MODEL_ID, prompt="", keep_alive="soon")
    assert error.value.status_code == 400 and "keep_alive" in error.value.error


def test_a_model_on_disk_with_no_instance_is_loaded_for_the_request(client: ollama.Client, node: FakeNode) -> None:
    node.delete_instance(node.instance_for(EMBEDDED_MODEL_ID).instance.instance_id)
    node.loaded_on_demand.clear()
    node.load_s = 0.3
    reply = client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION)
    assert reply.message.content == ANSWER
    assert node.loaded_on_demand == [node.instance_for(EMBEDDED_MODEL_ID).instance.instance_id]
    assert reply.load_duration is not None and reply.total_duration is not None
    assert 0.3e9 <= reply.load_duration <= reply.total_duration, "the load is counted, and counted in the total"
    assert client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION).load_duration < 0.3e9, "no load the second time"
    node.delete_instance(node.instance_for(EMBEDDED_MODEL_ID).instance.instance_id)
    loaded = client.generate(model=EMBEDDED_MODEL_ID, prompt="")
    assert loaded.done_reason == "load" and loaded.load_duration is not None and loaded.load_duration >= 0.3e9


def test_num_ctx_is_the_requests_context_window(client: ollama.Client, node: FakeNode) -> None:
    reply = client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_ctx": 64})
    assert reply.message.content == ANSWER and node.submitted[-1].context_window == 64
    prompt = prompt_tokens(node.submitted[-1])
    short = client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_ctx": prompt + 3})
    assert short.done_reason == "length" and short.eval_count == 3, "the answer fits in what is left of the window"
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_ctx": prompt})
    assert error.value.status_code == 400 and "context window is" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_ctx": node.context_window * 2})
    assert error.value.status_code == 400 and "num_ctx" in error.value.error and "max_context" in error.value.error


def test_a_model_loaded_for_a_request_is_placed_with_its_num_ctx(client: ollama.Client, node: FakeNode) -> None:
    node.delete_instance(node.instance_for(EMBEDDED_MODEL_ID).instance.instance_id)
    node.loaded_on_demand.clear()
    reply = client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_ctx": 300})
    assert reply.message.content == ANSWER
    record = node.instance_for(EMBEDDED_MODEL_ID)
    assert node.loaded_on_demand == [record.instance.instance_id]
    # placed as Ollama sizes a model it loads: the KV cache (and the memory counted for it) holds num_ctx positions
    assert (record.instance.max_context, record.instance.context_length, record.context_length) == (300, 300, 300)

    assert client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_ctx": 200}).done
    with pytest.raises(ollama.ResponseError) as error:  # more than the running instance holds
        client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_ctx": 600})
    assert error.value.status_code == 400 and "num_ctx" in error.value.error and "holds 300" in error.value.error
    assert node.loaded_on_demand == [record.instance.instance_id], "a running instance is not placed again"


def test_an_empty_prompt_loads_the_model_with_its_num_ctx(client: ollama.Client, node: FakeNode) -> None:
    node.delete_instance(node.instance_for(EMBEDDED_MODEL_ID).instance.instance_id)
    assert client.generate(model=EMBEDDED_MODEL_ID, prompt="", options={"num_ctx": 8}).done_reason == "load"
    record = node.instance_for(EMBEDDED_MODEL_ID)
    # the smallest window an instance is placed with; the request's own smaller one runs within it
    assert record.instance.context_length == 16


def test_the_total_duration_counts_the_whole_request(client: ollama.Client, node: FakeNode) -> None:
    node.token_delay_s = 0.1
    reply = client.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, options={"num_predict": 3})
    assert None not in (reply.total_duration, reply.prompt_eval_duration, reply.eval_duration)
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration, "the prompt and the answer in it"
