"""What only the real model can answer, through the official clients against a live node serving the embedded model:
it names Paris (whole and streamed), seeded sampling repeats, echo and streaming agree with the plain completion, the
real tokenizer's 8192-token context window refuses a longer prompt, and structured output (JSON schemas, any JSON
object, a choice list, Ollama's format) parses and validates, and a forced tool call (a named function, or
`required`) gives arguments that validate, whole and streamed alike. The API's contract is tested against a fake
node in tests/api/."""

from __future__ import annotations

import json
import math

import anthropic
import jsonschema_rs
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam, ChatCompletionToolParam

from tests.support.processes import LiveNode

pytestmark = pytest.mark.slow

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_node: LiveNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_names_paris(client: openai.OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 5 and 1 <= reply.usage.completion_tokens <= 12


def test_streamed_chat_names_paris_and_ends_with_usage(client: openai.OpenAI, model_id: str) -> None:
    chunks = list(client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 1 <= usage.completion_tokens <= 12


def test_seeded_sampling_with_penalties_repeats(client: openai.OpenAI, model_id: str) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=8, temperature=1.0,
                                               top_p=0.9, seed=seed, presence_penalty=0.5, frequency_penalty=0.5)
        return reply.choices[0].message.content or ""

    first = sample(1234)
    assert first and sample(1234) == first


def test_completions_with_echo_and_streaming_agree(client: openai.OpenAI, model_id: str) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
    assert plain.strip()
    echoed = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain


def test_prompt_over_the_context_window_is_a_bad_request(client: openai.OpenAI, model_id: str) -> None:
    long_prompt = "hello " * 9000  # over 8192 tokens in the model's own tokenizer
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=2)
    assert error.value.code == "context_length_exceeded" and "context window is 8192" in error.value.message


def test_ollama_chat_answers(live_node: LiveNode, model_id: str) -> None:
    reply = ollama.Client(host=live_node.url, timeout=120).chat(
        model=f"{model_id}:latest", messages=[{"role": "user", "content": "What is the capital of France?"}],
        options={"temperature": 0, "num_predict": 12})
    assert "Paris" in (reply.message.content or "")
    assert reply.done and reply.done_reason in ("stop", "length") and reply.eval_count and reply.prompt_eval_count


SCHEMAS = {
    "city": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                              "country": {"type": "string", "maxLength": 20}},
             "required": ["city", "country"], "additionalProperties": False},
    "nested, arrays, enums": {
        "type": "object",
        "properties": {
            "answer": {"enum": ["Paris", "Lyon", "Marseille"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
            "facts": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 2},
            "source": {"type": "object", "properties": {"kind": {"enum": ["memory", "book"]},
                                                        "checked": {"type": "boolean"}},
                       "required": ["kind", "checked"], "additionalProperties": False},
        },
        "required": ["answer", "confidence", "facts", "source"], "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_answers_parse_and_validate_whole_and_streamed(client: openai.OpenAI, model_id: str,
                                                                   name: str) -> None:
    schema = SCHEMAS[name]
    fields = {"model": model_id, "messages": QUESTION, "max_tokens": 200, "temperature": 0,
              "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                          "strict": True}}}
    reply = client.chat.completions.create(**fields)  # type: ignore[call-overload]
    text = reply.choices[0].message.content or ""
    jsonschema_rs.validate(schema, json.loads(text))
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**fields, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_json_object_and_choices_constrain_sampled_answers(client: openai.OpenAI, model_id: str) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=120, temperature=0.8,
                                               seed=seed, response_format={"type": "json_object"})
        if reply.choices[0].finish_reason == "stop":  # a sampled object may outrun max_tokens
            assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
        choice = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=10, temperature=1.0,
                                                seed=seed, extra_body={"guided_choice": ["Paris", "Rome", "Madrid"]})
        assert choice.choices[0].message.content in ("Paris", "Rome", "Madrid")


def test_ollama_format_schema_answers_validate(live_node: LiveNode, model_id: str) -> None:
    schema = SCHEMAS["city"]
    reply = ollama.Client(host=live_node.url, timeout=120).chat(
        model=f"{model_id}:latest", messages=[{"role": "user", "content": "What is the capital of France?"}],
        format=schema, options={"temperature": 0, "num_predict": 100})
    jsonschema_rs.validate(schema, json.loads(reply.message.content or ""))
    assert reply.done_reason == "stop"


def test_a_grammar_failing_mid_answer_ends_that_answer_alone(client: openai.OpenAI, model_id: str) -> None:
    failed = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=20, temperature=0,
                                            extra_body={"guided_regex": "(a{1000}){1000}"})
    assert failed.choices[0].finish_reason == "error"  # type: ignore[comparison-overlap]
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")


def test_logprobs_of_greedy_tokens_are_the_top_ones_whole_and_streamed(client: openai.OpenAI, model_id: str) -> None:
    fields = {"model": model_id, "messages": QUESTION, "max_tokens": 10, "temperature": 0, "logprobs": True,
              "top_logprobs": 5}
    reply = client.chat.completions.create(**fields)  # type: ignore[call-overload]
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 5 and token.logprob == max(t.logprob for t in token.top_logprobs) <= 0
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-4
    streamed = list(client.chat.completions.create(**fields, stream=True))  # type: ignore[call-overload]
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in content], abs=1e-4)
    completion = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=6,
                                           temperature=0, logprobs=3).choices[0]
    legacy = completion.logprobs
    assert legacy is not None and "".join(legacy.tokens or []) == completion.text
    for best, top in zip(legacy.token_logprobs or [], legacy.top_logprobs or [], strict=True):
        assert len(top) == 3 and best == max(top.values()) <= 0


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}}, "required": ["zone"],
        "additionalProperties": False}}},
]
WEATHER_QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_calls(chunks: list[ChatCompletionChunk]) -> tuple[str, list[tuple[str, str]]]:
    content, calls = "", {}
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                if delta.id is not None:
                    calls[delta.index] = [delta.function.name, ""]
                calls[delta.index][1] += delta.function.arguments or ""
    return content, [(name, arguments) for name, arguments in calls.values()]


def test_a_named_tool_choice_gives_a_valid_call_whole_and_streamed(client: openai.OpenAI, model_id: str) -> None:
    fields = {"model": model_id, "messages": WEATHER_QUESTION, "tools": TOOLS, "max_tokens": 60, "temperature": 0,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    reply = client.chat.completions.create(**fields)  # type: ignore[call-overload]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema_rs.validate(WEATHER_SCHEMA, json.loads(call.function.arguments))
    streamed = list(client.chat.completions.create(**fields, stream=True))  # type: ignore[call-overload]
    assert streamed_calls(streamed) == ("", [("get_weather", call.function.arguments)])
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_calls_one_tool_with_valid_arguments(client: openai.OpenAI, model_id: str) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(2):
        reply = client.chat.completions.create(model=model_id, messages=WEATHER_QUESTION, tools=TOOLS, seed=seed,
                                               tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                               temperature=0.7)
        (call,) = reply.choices[0].message.tool_calls or []
        jsonschema_rs.validate(schemas[call.function.name], json.loads(call.function.arguments))


def test_a_conversation_with_a_call_and_its_result_goes_on(client: openai.OpenAI, live_node: LiveNode,
                                                          model_id: str) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages: list[ChatCompletionMessageParam] = [
        *WEATHER_QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    reply = client.chat.completions.create(model=model_id, messages=messages, tools=TOOLS, max_tokens=20,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    answer = ollama.Client(host=live_node.url, timeout=120).chat(
        model=f"{model_id}:latest", tools=TOOLS, options={"temperature": 0, "num_predict": 20}, messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
            {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"}])
    assert answer.done and answer.eval_count


def test_anthropic_messages_answer_and_force_a_valid_tool_use(live_node: LiveNode, model_id: str) -> None:
    client = anthropic.Anthropic(base_url=live_node.url, api_key="unused", max_retries=0, timeout=120)
    reply = client.messages.create(model=model_id, max_tokens=12, messages=[  # type: ignore[arg-type]
        {"role": "user", "content": "What is the capital of France?"}], extra_body={"temperature": 0})
    assert "Paris" in reply.content[0].text and reply.stop_reason in ("end_turn", "max_tokens")  # type: ignore[union-attr]
    tool = {"name": "get_weather", "description": "The weather in a city now", "input_schema": WEATHER_SCHEMA}
    fields = {"model": model_id, "max_tokens": 60, "tools": [tool], "extra_body": {"temperature": 0},
              "tool_choice": {"type": "tool", "name": "get_weather"},
              "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    forced = client.messages.create(**fields)  # type: ignore[call-overload]
    (use,) = forced.content
    jsonschema_rs.validate(WEATHER_SCHEMA, use.input)
    with client.messages.stream(**fields) as stream:  # type: ignore[arg-type]
        assert stream.get_final_message().content[0].input == use.input  # type: ignore[union-attr]


def test_a_response_whole_and_streamed_names_paris(client: openai.OpenAI, model_id: str) -> None:
    fields = {"model": model_id, "input": "What is the capital of France?", "max_output_tokens": 12,
              "temperature": 0}
    reply = client.responses.create(**fields)  # type: ignore[call-overload]
    assert "Paris" in reply.output_text
    with client.responses.stream(**fields) as stream:  # type: ignore[arg-type]
        assert stream.get_final_response().output_text == reply.output_text
