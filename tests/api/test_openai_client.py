"""The OpenAI-compatible API through the official `openai` client: response shapes, streaming (role, usage chunk,
finish reasons), what each request turns into for the node (messages, prompt, sampling, stop, max_tokens), echo,
refusals as statuses and error shapes, errors in a stream, and a client that leaves mid-answer."""

from __future__ import annotations

import itertools
import json
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.errors import TaskError
from ringlet.shared.tasks import ChatMessage, Constraint, SamplingParams
from tests.support.fake_node import REPLY, FakeNode, prompt_tokens
from tests.support.processes import wait_until

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "".join(REPLY)
# the reply's tokens and the end-of-sequence token after them
REPLY_TOKENS = len(REPLY) + 1


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_list_what_is_on_disk_and_served_the_served_first(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert models[0].id == EMBEDDED_MODEL_ID == "SmolLM2-135M-Instruct"
    assert len({m.id for m in models}) == len(models)
    assert "Qwen/Qwen3-8B" not in {m.id for m in models}, "the catalog's models are not listed until on disk"
    assert [m.id for m in models if m.model_extra and m.model_extra["ready"]] == [EMBEDDED_MODEL_ID]
    assert models[0].created > 0


def test_chat_completion_answers_with_the_generated_text_and_usage(client: openai.OpenAI, node: FakeNode) -> None:
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.created > 0
    assert reply.model == EMBEDDED_MODEL_ID
    choice = reply.choices[0]
    assert choice.message.content == ANSWER and choice.message.role == "assistant" and choice.finish_reason == "stop"
    (task,) = node.submitted
    assert task.messages == [ChatMessage(role="user", content="What is the capital of France?")]
    assert task.prompt is None and task.max_tokens == 12 and task.sampling.greedy and task.stop == []
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens(task), REPLY_TOKENS)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_model_alias_or_an_instance_id_is_answered_under_the_model_id(client: openai.OpenAI,
                                                                       node: FakeNode) -> None:
    (instance_id,) = node.state.instances
    for name in ("smollm2-135m", f"{EMBEDDED_MODEL_ID}:latest", "HuggingFaceTB/SmolLM2-135M-Instruct", instance_id):
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=2)
        assert reply.model == EMBEDDED_MODEL_ID and node.submitted[-1].model == name


def test_chat_completion_streams_with_a_usage_chunk(client: openai.OpenAI, node: FakeNode) -> None:
    stream = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None and all(c.usage is None for c in chunks[:-1])
    assert usage_chunk.usage.prompt_tokens == prompt_tokens(node.submitted[-1])
    assert usage_chunk.usage.completion_tokens == REPLY_TOKENS


def test_streaming_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=3,
                                                 stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_sse_stream_is_data_lines_ending_in_done(url: str) -> None:
    body = {"model": EMBEDDED_MODEL_ID, "messages": QUESTION, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["cache-control"] == "no-cache"
        text = reply.read().decode()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], "every event ends in a blank line, the last is [DONE]"
    chunks = events[:-2]
    assert all(e.startswith("data: {") for e in chunks)
    assert len(chunks) == 3 + 1, "one chunk per token, then the one with the finish reason"


def test_max_tokens_and_stop_are_honoured(client: openai.OpenAI, node: FakeNode) -> None:
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=9,
                                           max_completion_tokens=2)
    assert node.submitted[-1].max_tokens == 2, "max_completion_tokens wins over max_tokens"
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content == "The capital"

    stopped = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=12,
                                             stop=["Paris", "Rome"])
    assert node.submitted[-1].stop == ["Paris", "Rome"]
    assert stopped.choices[0].message.content == "The capital of France is "
    assert stopped.choices[0].finish_reason == "stop"
    # a stop string that spans tokens, given as one string, streamed: never shown, not even in part
    stream = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, stop="France is",
                                            stream=True)
    assert node.submitted[-1].stop == ["France is"]
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "The capital of "


def test_sampling_parameters_reach_the_task(client: openai.OpenAI, node: FakeNode) -> None:
    client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=8, temperature=1.2,
                                   top_p=0.9, seed=1234, presence_penalty=0.5, frequency_penalty=-0.5,
                                   extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    assert node.submitted[-1].sampling == SamplingParams(
        temperature=1.2, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
        frequency_penalty=-0.5, seed=1234)
    client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=2)
    assert node.submitted[-1].sampling == SamplingParams(), "OpenAI's defaults: temperature 1, no seed"
    client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=2, top_p=0,
                                   temperature=0.7)
    assert node.submitted[-1].sampling.temperature == 0.0, "top_p 0 is greedy"


def test_messages_of_every_form_reach_the_task_as_text(client: openai.OpenAI, node: FakeNode) -> None:
    client.chat.completions.create(model=EMBEDDED_MODEL_ID, max_tokens=2, messages=[
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "France?"}]},
        {"role": "assistant", "content": "A country."},
        {"role": "user", "content": "And its capital?"}])
    assert node.submitted[-1].messages == [
        ChatMessage(role="system", content="Answer briefly."), ChatMessage(role="user", content="What is France?"),
        ChatMessage(role="assistant", content="A country."), ChatMessage(role="user", content="And its capital?")]


def test_completions_continue_a_raw_prompt(client: openai.OpenAI, node: FakeNode) -> None:
    reply = client.completions.create(model=EMBEDDED_MODEL_ID, prompt="The capital of France is", max_tokens=4,
                                      temperature=0)
    task = node.submitted[-1]
    assert task.prompt == "The capital of France is" and task.messages is None and task.max_tokens == 4
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == "The capital of France" and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 4)
    client.completions.create(model=EMBEDDED_MODEL_ID, prompt=["One prompt in a list"])
    assert node.submitted[-1].prompt == "One prompt in a list" and node.submitted[-1].max_tokens == 16, \
        "OpenAI's default max_tokens for completions"

    echoed = client.completions.create(model=EMBEDDED_MODEL_ID, prompt="One, two,", max_tokens=2, echo=True)
    assert echoed.choices[0].text == "One, two,The capital"
    streamed = list(client.completions.create(model=EMBEDDED_MODEL_ID, prompt="One, two,", max_tokens=2, echo=True,
                                              stream=True, stream_options={"include_usage": True}))
    assert streamed[0].choices[0].text.startswith("One, two,")
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
    assert streamed[-1].choices == [] and streamed[-1].usage is not None
    assert streamed[-1].usage.completion_tokens == 2


def test_unknown_model_is_not_found_and_lists_the_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)
    assert error.value.code == "model_not_found" and error.value.param == "model"
    assert "no-such-model" in error.value.message and EMBEDDED_MODEL_ID in error.value.message


def test_invalid_parameters_are_bad_requests_naming_the_parameter(client: openai.OpenAI, node: FakeNode) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, temperature=3.5)
    assert error.value.param == "temperature" and "temperature" in error.value.message
    assert error.value.code == "invalid_parameter"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, n=17)
    assert error.value.param == "n"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=[])
    assert error.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, stop=["ok", ""])
    assert "stop strings must not be empty" in error.value.message
    assert node.submitted == [], "an invalid request never reaches the node"


@pytest.mark.parametrize(("body", "code", "problem"), [
    ("{not json", "invalid_json", "the body is not valid JSON"),
    ("", "invalid_json", "the body is empty"),
    (json.dumps({"model": EMBEDDED_MODEL_ID, "messages": QUESTION, "temperature": float("nan")}),
     "invalid_parameter", "temperature: nan is not a number this field takes"),
    (json.dumps({"model": EMBEDDED_MODEL_ID, "messages": QUESTION, "top_p": float("inf")}),
     "invalid_parameter", "top_p: inf is not a number"),
])
def test_a_body_that_is_not_a_request_is_a_bad_request_saying_why(url: str, node: FakeNode, body: str, code: str,
                                                                   problem: str) -> None:
    reply = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                       timeout=30)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["code"] == code and problem in error["message"], error
    assert code != "invalid_json" or error["param"] is None
    assert node.submitted == []


def test_prompt_over_the_context_window_is_a_bad_request(client: openai.OpenAI, node: FakeNode) -> None:
    long_prompt = "hello " * (node.context_window + 10)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=2)
    assert error.value.code == "context_length_exceeded" and error.value.param == "messages"
    assert "context window" in error.value.message
    assert not node.tasks, "the refused task is not in flight"


def test_a_model_is_unavailable_until_its_instance_is_ready(client: openai.OpenAI, node: FakeNode,
                                                           url: str) -> None:
    with pytest.raises(openai.InternalServerError) as error:  # the client's class for every 5xx
        client.chat.completions.create(model="Qwen/Qwen3-0.6B", messages=QUESTION, max_tokens=2)
    assert error.value.status_code == 503 and error.value.code == "no_instance"
    assert "POST /instance" in error.value.message and "ringlet node --model" in error.value.message

    created = httpx.post(url + "/instance", json={"model": "Qwen/Qwen3-0.6B", "instance_type": "CpuRing"})
    assert created.status_code == 201 and created.json()["status"] == "loading"
    instance_id = created.json()["instance"]["instance_id"]
    try:
        loading = httpx.post(url + "/v1/chat/completions", json={"model": "Qwen/Qwen3-0.6B", "messages": QUESTION})
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "instance_loading"
        assert loading.headers["retry-after"] == "5" and "still loading" in loading.json()["error"]["message"]
        node.make_ready(instance_id)
        reply = client.chat.completions.create(model="qwen/qwen3-0.6b", messages=QUESTION, max_tokens=2)
        assert reply.model == "Qwen/Qwen3-0.6B"
    finally:
        assert httpx.delete(f"{url}/instance/{instance_id}").status_code == 200


def test_a_task_failing_mid_answer_is_an_error_status_or_an_error_event(client: openai.OpenAI, node: FakeNode,
                                                                       url: str) -> None:
    node.script = lambda: ["The", TaskError("runner_failed", "the runner of the instance exited with -9")]
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION)
    assert error.value.status_code == 503 and error.value.code == "runner_failed"
    assert "exited with -9" in error.value.message

    body = {"model": EMBEDDED_MODEL_ID, "messages": QUESTION, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200, "the status line went out with the first chunk"
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[0]["choices"][0]["delta"]["content"] == "The"
    assert events[-1] == {"error": {"message": "the runner of the instance exited with -9", "type": "unavailable_error",
                                    "param": None, "code": "runner_failed"}}, "and no [DONE] after it"
    with pytest.raises(openai.APIError) as streamed_error:
        list(client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, stream=True))
    assert streamed_error.value.code == "runner_failed"


def cancelled_generations(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('ringlet_generations_total{api="openai"') and 'outcome="cancelled"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_leaves_cancels_its_task(node: FakeNode, url: str) -> None:
    node.script, node.token_delay_s = lambda: itertools.repeat(" more"), 0.005
    cancelled_before = cancelled_generations(url)
    body = {"model": EMBEDDED_MODEL_ID, "messages": QUESTION, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as reply:
        events = reply.iter_lines()
        assert next(events).startswith("data: ")
        (task,) = node.tasks.values()
        assert task.status == "running" and task.model == EMBEDDED_MODEL_ID
    wait_until(lambda: not node.tasks, 5, "the streamed task cancelled once its client left")

    began = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    wait_until(lambda: not node.tasks, 5, "the unstreamed task cancelled once its client left")
    assert time.monotonic() - began < 3
    assert len(node.closed) == 2 and node.closed[0] == task.task_id, "the API closed both streams (not the GC)"
    assert cancelled_generations(url) == cancelled_before + 2


def test_n_choices_come_back_whole_and_streamed(client: openai.OpenAI, node: FakeNode) -> None:
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, n=3, max_tokens=4, seed=5)
    assert node.submitted[-1].n == 3 and node.submitted[-1].sampling.seed == 5
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content == "The capital of France" and c.finish_reason == "length" for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, n=2, max_tokens=2,
                                                 stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and all(c.delta.role is None for c in mine[1:])
        assert "".join(c.delta.content or "" for c in mine) == "The capital"
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    text = client.completions.create(model=EMBEDDED_MODEL_ID, prompt="Name a city", n=2, max_tokens=3, echo=True)
    assert [c.text for c in text.choices] == ["Name a cityThe capital of"] * 2


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name"], "additionalProperties": False}


def test_response_formats_and_guided_fields_become_the_tasks_constraint(client: openai.OpenAI,
                                                                        node: FakeNode) -> None:
    def constraint_of(**fields: object) -> Constraint | None:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=2, **fields)  # type: ignore[call-overload]
        return node.submitted[-1].sampling.constraint

    schema = {"name": "person", "schema": PERSON, "strict": True}
    assert constraint_of(response_format={"type": "json_schema", "json_schema": schema}) == Constraint(
        kind="json_schema", spec=json.dumps(PERSON))
    assert constraint_of(response_format={"type": "json_object"}) == Constraint(kind="json_object")
    assert constraint_of(response_format={"type": "json_schema", "json_schema": {"name": "any"}}) == Constraint(
        kind="json_object")
    assert constraint_of(response_format={"type": "text"}) is None
    assert constraint_of(extra_body={"guided_regex": "[0-9]+"}) == Constraint(kind="regex", spec="[0-9]+")
    assert constraint_of(extra_body={"guided_choice": ["yes", "no"]}) == Constraint(kind="choice",
                                                                                   spec='["yes", "no"]')
    client.completions.create(model=EMBEDDED_MODEL_ID, prompt="Yes or no?", max_tokens=2,
                              extra_body={"guided_choice": ["yes", "no"]})
    assert node.submitted[-1].sampling.constraint == Constraint(kind="choice", spec='["yes", "no"]')


@pytest.mark.parametrize(("fields", "param", "problem"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "sandwich"}}}},
     "response_format", "sandwich"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is given with type json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex", "regex"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}}, None, "at most one of"),
])
def test_a_constraint_that_cannot_compile_is_a_bad_request_naming_it(client: openai.OpenAI, node: FakeNode,
                                                                     fields: dict, param: str | None,
                                                                     problem: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=2, **fields)
    assert problem in error.value.message and error.value.code == "invalid_parameter"
    if param is not None:
        assert error.value.param == param and param.split(".")[0] in error.value.message
    assert node.submitted == []


def test_logit_bias_reaches_the_task_as_token_ids(client: openai.OpenAI, node: FakeNode) -> None:
    client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=2,
                                   logit_bias={"17": 5, "42": -100})
    assert node.submitted[-1].sampling.logit_bias == {17: 5.0, 42: -100.0}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, logit_bias={"seventeen": 5})
    assert (error.value.param or "").startswith("logit_bias")


def test_logprobs_come_with_each_token_whole_and_streamed(client: openai.OpenAI, node: FakeNode) -> None:
    reply = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=12, logprobs=True,
                                           top_logprobs=3)
    assert node.submitted[-1].sampling.logprobs == 3
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and "".join(t.token for t in content) == reply.choices[0].message.content == ANSWER
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert content[0].bytes == list(content[0].token.encode())
    streamed = list(client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=12,
                                                   logprobs=True, top_logprobs=3, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=2)
    assert plain.choices[0].logprobs is None and node.submitted[-1].sampling.logprobs is None
    client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, max_tokens=2, logprobs=True)
    assert node.submitted[-1].sampling.logprobs == 0
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, top_logprobs=2)
    assert error.value.param == "top_logprobs" and "needs logprobs" in error.value.message


def test_completions_logprobs_come_in_the_legacy_shape_whole_and_streamed(client: openai.OpenAI,
                                                                          node: FakeNode) -> None:
    reply = client.completions.create(model=EMBEDDED_MODEL_ID, prompt="The capital", max_tokens=12, logprobs=2)
    assert node.submitted[-1].sampling.logprobs == 2
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == list(REPLY) and "".join(logprobs.tokens) == ANSWER
    assert logprobs.text_offset == [0, *itertools.accumulate(len(t) for t in REPLY)][:-1]
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert all(len(top) == 2 and top[token] == best for token, best, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True))
    streamed = list(client.completions.create(model=EMBEDDED_MODEL_ID, prompt="The capital", max_tokens=12,
                                              logprobs=2, stream=True))
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens or []] == logprobs.tokens
    assert [o for p in pieces for o in p.text_offset or []] == logprobs.text_offset
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=EMBEDDED_MODEL_ID, prompt="The capital", logprobs=2, echo=True)
    assert error.value.param == "logprobs" and "echo" in error.value.message
