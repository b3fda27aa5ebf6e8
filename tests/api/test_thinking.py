"""Thinking apart from the answer, through the official openai, ollama and anthropic clients against fake nodes whose
runner reported a model that thinks (Qwen3-style: the answer opens its think block; R1-style: the prompt opened it):
whole and streamed answers (a stream cut at every character puts back the same parts), tool calls after the
thinking, the switch each API sets for the chat template, and a model that does not think left as it was."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import ollama
import openai
import pytest

from ringlet.api.app import create_app
from ringlet.cli.chat import _reply
from ringlet.cli.client import NodeClient
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.state import RunnerReady
from ringlet.shared.tasks import ThinkingFormat
from tests.support.fake_api import FakeServer
from tests.support.fake_node import FakeNode, serving

QWEN3 = ThinkingFormat(switch=True)
R1 = ThinkingFormat(opened_by_default=True, opened_when_on=True, opened_when_off=True)
ANSWER = ("<think>", "\nThe user", " asks 1+1", ".\n", "</th", "ink>\n\n", "It is", " 2.")
THINKING, CONTENT = "The user asks 1+1.", "It is 2."
QUESTION = [{"role": "user", "content": "What is 1 + 1?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    """A fake node whose instance reports a Qwen3-style thinking model."""
    fake = FakeNode(tmp_path_factory.mktemp("thinking-node"))
    report(fake, QWEN3)
    try:
        with serving(create_app(fake)) as url:
            yield FakeServer(fake, url)
    finally:
        fake.downloads.close()


def report(fake: FakeNode, thinking: ThinkingFormat) -> None:
    instance_id = next(iter(fake.state.instances))
    fake.emit(RunnerReady(instance_id=instance_id, node_id=fake.node_id, context_length=fake.context_window,
                          thinking=thinking))


@pytest.fixture
def thinker(thinking_server: FakeServer) -> Iterator[FakeNode]:
    fake = thinking_server.node
    fake.submitted.clear()
    fake.script = lambda: ANSWER
    yield fake
    report(fake, QWEN3)


@pytest.fixture
def oai(thinking_server: FakeServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def olla(thinking_server: FakeServer) -> ollama.Client:
    return ollama.Client(host=thinking_server.url, timeout=30)


@pytest.fixture
def claude(thinking_server: FakeServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0, timeout=30)


def streamed_openai(client: openai.OpenAI, **fields: object) -> tuple[str, str, list[str]]:
    """The stream's thinking and content put together, and which came in each event (in order)."""
    thinking, content, order = "", "", []
    for chunk in client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, stream=True,
                                                **fields):
        for choice in chunk.choices:
            piece = getattr(choice.delta, "reasoning_content", None)
            if piece:
                thinking += piece
                order.append("thinking")
            if choice.delta.content:
                content += choice.delta.content
                order.append("content")
    return thinking, content, order


def test_openai_answers_carry_the_thinking_as_reasoning_content(oai: openai.OpenAI, thinker: FakeNode) -> None:
    message = oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION).choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == (THINKING, CONTENT)
    thinking, content, order = streamed_openai(oai)
    assert (thinking, content) == (THINKING, CONTENT)
    assert order == sorted(order, key=["thinking", "content"].index), "all thinking comes before the answer"
    assert thinker.submitted[0].thinking is None, "no switch asked for: the template's default"


def test_a_stream_cut_at_every_character_gives_the_same_parts(oai: openai.OpenAI, thinker: FakeNode) -> None:
    thinker.script = lambda: tuple("".join(ANSWER))
    assert streamed_openai(oai)[:2] == (THINKING, CONTENT)
    reply = oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, n=2)
    assert [(getattr(c.message, "reasoning_content", None), c.message.content) for c in reply.choices] == [
        (THINKING, CONTENT)] * 2, "each choice is split on its own"


def test_a_prompt_that_opened_the_thinking_starts_the_answer_inside_it(oai: openai.OpenAI, thinker: FakeNode) -> None:
    report(thinker, R1)
    thinker.script = lambda: ("Okay", ", 1+1 is 2.", "\n</think>", "\n\n**2**")
    assert streamed_openai(oai)[:2] == ("Okay, 1+1 is 2.", "**2**")
    thinker.script = lambda: ("Still thinking", " when max_tokens cut it")
    message = oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION,
                                          max_tokens=2).choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == (
        "Still thinking when max_tokens cut it", "")


def test_tool_calls_are_read_after_the_thinking(oai: openai.OpenAI, thinker: FakeNode) -> None:
    thinker.script = lambda: ("<think>I could write <tool_call>{}</tool_call> here", "</think>\n\n",
                              '<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>')
    reply = oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION,
                                        tools=[WEATHER])
    message = reply.choices[0].message
    assert getattr(message, "reasoning_content", None) == "I could write <tool_call>{}</tool_call> here"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("get_weather", '{"city":"Paris"}')]
    assert reply.choices[0].finish_reason == "tool_calls" and not message.content


@pytest.mark.parametrize(("fields", "switch"), [
    ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, False),
    ({"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}, True),
    ({"reasoning_effort": "none"}, False),
    ({"reasoning_effort": "high"}, True),
])
def test_the_openai_switch_reaches_the_task(oai: openai.OpenAI, thinker: FakeNode, fields: dict,
                                            switch: bool) -> None:
    oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, **fields)
    assert thinker.submitted[-1].thinking is switch


@pytest.mark.parametrize(("fields", "problem"), [
    ({"reasoning_effort": "none", "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}, "contradict"),
    ({"reasoning_effort": "high", "response_format": {"type": "json_object"}}, "thinking cannot be on"),
    ({"extra_body": {"chat_template_kwargs": {"add_vision_id": True}}}, "add_vision_id"),
])
def test_a_switch_that_cannot_be_honoured_is_a_400(oai: openai.OpenAI, fields: dict, problem: str) -> None:
    with pytest.raises(openai.BadRequestError) as refusal:
        oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION, **fields)
    assert problem in refusal.value.message


def test_a_grammar_turns_thinking_off_and_keeps_the_answer_whole(oai: openai.OpenAI, thinker: FakeNode) -> None:
    thinker.script = lambda: ('{"a": ', '"<think>"}')
    reply = oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION,
                                        response_format={"type": "json_object"})
    assert reply.choices[0].message.content == '{"a": "<think>"}'
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None
    assert thinker.submitted[-1].thinking_switch is False


def test_ollama_sends_thinking_apart_by_default_and_on_request(olla: ollama.Client, thinker: FakeNode) -> None:
    for think in (None, True):
        reply = olla.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, think=think)
        assert (reply.message.thinking, reply.message.content) == (THINKING, CONTENT)
        lines = list(olla.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, think=think, stream=True))
        assert "".join(line.message.thinking or "" for line in lines) == THINKING
        assert "".join(line.message.content for line in lines) == CONTENT
        assert lines[-1].done and all(not line.message.thinking for line in lines if line.message.content)
    assert [task.thinking for task in thinker.submitted] == [None, None, True, True]
    generated = olla.generate(model=EMBEDDED_MODEL_ID, prompt="What is 1 + 1?")
    assert (generated.thinking, generated.response) == (THINKING, CONTENT)
    raw = olla.generate(model=EMBEDDED_MODEL_ID, prompt="<|im_start|>user\nHi", raw=True)
    assert (raw.thinking, raw.response) == (None, "".join(ANSWER)), "a raw prompt skips the template: no splitting"


def test_ollama_think_false_and_levels_set_the_switch(olla: ollama.Client, thinker: FakeNode) -> None:
    olla.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, think=False)
    olla.chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, think="high")
    assert [task.thinking for task in thinker.submitted] == [False, True]
    assert "thinking" in olla.show(EMBEDDED_MODEL_ID).capabilities


def test_an_earlier_answers_thinking_is_accepted_back(olla: ollama.Client, oai: openai.OpenAI,
                                                      thinker: FakeNode) -> None:
    olla.chat(model=EMBEDDED_MODEL_ID, messages=[*QUESTION, {"role": "assistant", "content": "2", "thinking": "hm"},
                                                 {"role": "user", "content": "And 2+2?"}])
    oai.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=[
        *QUESTION, {"role": "assistant", "content": "2", "reasoning_content": "hm"},
        {"role": "user", "content": "And 2+2?"}])
    assert all(task.messages is not None and [m.content for m in task.messages] == [
        "What is 1 + 1?", "2", "And 2+2?"] for task in thinker.submitted)


def test_anthropic_thinking_blocks_whole_and_streamed(claude: anthropic.Anthropic, thinker: FakeNode) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    reply = claude.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=2000, messages=QUESTION,
                                   thinking=thinking)
    assert [b.type for b in reply.content] == ["thinking", "text"]
    block, text = reply.content
    assert (block.thinking, text.text) == (THINKING, CONTENT)
    assert block.signature
    with claude.messages.stream(model=EMBEDDED_MODEL_ID, max_tokens=2000, messages=QUESTION,
                                thinking=thinking) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in reply.content]
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas[0] == "thinking_delta" and deltas.index("signature_delta") < deltas.index("text_delta")
    assert "thinking_delta" not in deltas[deltas.index("signature_delta"):]
    assert [task.thinking for task in thinker.submitted] == [True, True]


@pytest.mark.parametrize("thinking", [None, {"type": "disabled"}])
def test_anthropic_without_thinking_enabled_has_no_thinking_blocks(claude: anthropic.Anthropic, thinker: FakeNode,
                                                                   thinking: dict | None) -> None:
    fields = {"thinking": thinking} if thinking else {}
    reply = claude.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=200, messages=QUESTION,
                                   **fields)
    assert [(b.type, b.text) for b in reply.content] == [("text", CONTENT)]
    with claude.messages.stream(model=EMBEDDED_MODEL_ID, max_tokens=200, messages=QUESTION,
                                **fields) as stream:
        assert "".join(stream.text_stream) == CONTENT
        assert [b.type for b in stream.get_final_message().content] == ["text"]
    assert [task.thinking for task in thinker.submitted] == [False, False], "Anthropic's default: no thinking"


def test_anthropic_takes_earlier_thinking_blocks_back(claude: anthropic.Anthropic, thinker: FakeNode) -> None:
    claude.messages.create(model=EMBEDDED_MODEL_ID, max_tokens=2000, thinking={"type": "adaptive"}, messages=[
        *QUESTION, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                     {"type": "text", "text": "2"}]},
        {"role": "user", "content": "And 2+2?"}])
    (task,) = thinker.submitted
    assert task.messages is not None and [m.content for m in task.messages] == ["What is 1 + 1?", "2", "And 2+2?"]


def test_responses_have_a_reasoning_item_whole_and_streamed(oai: openai.OpenAI, thinker: FakeNode) -> None:
    reply = oai.responses.create(model=EMBEDDED_MODEL_ID, input="What is 1 + 1?", reasoning={"effort": "medium"})
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    reasoning = reply.output[0]
    assert [c.text for c in reasoning.content or []] == [THINKING] and reply.output_text == CONTENT
    with oai.responses.stream(model=EMBEDDED_MODEL_ID, input="What is 1 + 1?") as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == THINKING and final.output_text == CONTENT
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert [c.text for c in final.output[0].content or []] == [THINKING]
    assert [task.thinking for task in thinker.submitted] == [True, None]
    oai.responses.create(model=EMBEDDED_MODEL_ID, reasoning={"effort": "none"}, input=[
        {"role": "user", "content": "What is 1 + 1?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 2+2?"}])
    assert thinker.submitted[-1].thinking is False


def test_a_model_that_does_not_think_is_left_as_it_was(url: str, node: FakeNode) -> None:
    node.script = lambda: ("<think>", "not thinking", "</think>", " text")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    message = client.chat.completions.create(model=EMBEDDED_MODEL_ID, messages=QUESTION).choices[0].message
    assert (message.content, getattr(message, "reasoning_content", None)) == ("<think>not thinking</think> text", None)
    with pytest.raises(ollama.ResponseError) as refusal:
        ollama.Client(host=url, timeout=30).chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, think=True)
    assert refusal.value.status_code == 400 and "does not support thinking" in refusal.value.error
    plain = ollama.Client(host=url, timeout=30).chat(model=EMBEDDED_MODEL_ID, messages=QUESTION, think=False)
    assert (plain.message.content, plain.message.thinking) == ("<think>not thinking</think> text", None)


def test_ringlet_chat_shows_the_thinking_and_keeps_only_the_answer(thinking_server: FakeServer, thinker: FakeNode,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    answer = _reply(NodeClient(thinking_server.url), {"model": EMBEDDED_MODEL_ID, "messages": QUESTION,
                                                       "stream": True})
    assert answer == CONTENT
    assert capsys.readouterr().out == f"{THINKING}\n\n{CONTENT}\n"
