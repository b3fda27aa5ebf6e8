from __future__ import annotations

import itertools
import json
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ringlet.models.tool_parsing import Event, ParsedCall, ToolCallParser, ToolFormat

TOOLS = ["get_weather", "get_time", "echo"]
FORMATS: list[ToolFormat] = ["hermes", "llama3", "mistral"]
MARKERS = ["<tool_call>", "<|python_tag|>", "[TOOL_CALLS]"]


def call(name: str, **arguments: object) -> ParsedCall:
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


def merged(events: list[Event]) -> list[Event]:
    assert "" not in events, "an empty string was emitted"
    out: list[Event] = []
    for event in events:
        if isinstance(event, str) and out and isinstance(out[-1], str):
            out[-1] += event
        else:
            out.append(event)
    return out


def parse(fmt: ToolFormat, pieces: list[str], tools: list[str] = TOOLS) -> list[Event]:
    parser = ToolCallParser(fmt, tools)
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    assert parser.calls == [e for e in events if isinstance(e, ParsedCall)]
    return merged(events)


def every_split(text: str) -> list[list[str]]:
    """The text whole, in two pieces cut at every position, and one character at a time."""
    return [[text], *([text[:i], text[i:]] for i in range(1, len(text))), list(text)]


def assert_streams_to(fmt: ToolFormat, text: str, expected: list[Event], tools: list[str] = TOOLS) -> None:
    for pieces in every_split(text):
        assert parse(fmt, pieces, tools) == expected, pieces


QWEN_TWO_CALLS = (
    "I'll look up the weather in both cities.\n"
    "<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>\n"
    "<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}}\n'
    "</tool_call>"
)
QWEN3_THINKING = (
    "<think>\nThe user wants the time in Paris; I have a get_time tool {with a timezone}.\n</think>\n\n"
    '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>\n'
)
HERMES_CALL_THEN_TEXT = (
    'Checking.<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call>\n\nDone: see above.'
)
LLAMA_BARE = '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "fahrenheit"}}'
LLAMA_TAGGED = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}'
)
MISTRAL_ARRAY = (
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {"timezone": "CET"}, "id": "a1b2c3d4e"}]'
)
MISTRAL_ARGS = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"timezone": "CET"}'
MISTRAL_BARE = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'

RECORDED: list[tuple[ToolFormat, str, list[Event]]] = [
    ("hermes", QWEN_TWO_CALLS, ["I'll look up the weather in both cities.\n",
                                call("get_weather", city="Paris", unit="celsius"),
                                call("get_weather", city="Tokyo", unit="celsius")]),
    ("hermes", QWEN3_THINKING, [QWEN3_THINKING[:QWEN3_THINKING.index("<tool_call>")],
                                call("get_time", timezone="Europe/Paris")]),
    ("hermes", HERMES_CALL_THEN_TEXT, ["Checking.", call("echo", text="hi"), "\n\nDone: see above."]),
    ("llama3", LLAMA_BARE, [call("get_weather", city="San Francisco", unit="fahrenheit")]),
    ("llama3", "\n\n" + LLAMA_BARE, [call("get_weather", city="San Francisco", unit="fahrenheit")]),
    ("llama3", LLAMA_TAGGED, [call("get_weather", city="Paris"), call("get_time", timezone="Europe/Paris")]),
    ("llama3", "Let me check. " + LLAMA_TAGGED, ["Let me check. ", call("get_weather", city="Paris"),
                                                 call("get_time", timezone="Europe/Paris")]),
    ("mistral", MISTRAL_ARRAY, [call("get_weather", city="Paris"), call("get_time", timezone="CET")]),
    ("mistral", MISTRAL_ARGS, [call("get_weather", city="Paris"), call("get_time", timezone="CET")]),
    ("mistral", MISTRAL_BARE, [call("get_weather", city="Paris")]),
    ("mistral", "Sure.\n" + MISTRAL_ARGS + "\nAnything else?",
     ["Sure.\n", call("get_weather", city="Paris"), call("get_time", timezone="CET"), "\nAnything else?"]),
]


@pytest.mark.parametrize(("fmt", "text", "expected"), RECORDED, ids=[f"{f}-{i}" for i, (f, _, _) in
                                                                      enumerate(RECORDED)])
def test_recorded_answers_parse_the_same_however_split(fmt: ToolFormat, text: str, expected: list[Event]) -> None:
    # equal merged events mean the content is exact: no piece of a marker or call leaked into it
    assert_streams_to(fmt, text, expected)


def test_a_call_comes_out_with_the_piece_that_completes_it() -> None:
    parser = ToolCallParser("hermes", TOOLS)
    assert parser.feed('Hi<tool_call>{"name": "echo", "arguments": {"text": "x"}}\n</tool_') == ["Hi"]
    assert parser.feed("call>") == [call("echo", text="x")]
    assert parser.finish() == []

    parser = ToolCallParser("llama3", TOOLS)
    assert parser.feed(LLAMA_BARE[:-1]) == []
    assert parser.feed("}") == [call("get_weather", city="San Francisco", unit="fahrenheit")]

    parser = ToolCallParser("mistral", TOOLS)
    assert parser.feed('[TOOL_CALLS]get_time[ARGS]{"timezone": "CET"') == []
    assert parser.feed("}") == [call("get_time", timezone="CET")]


@pytest.mark.parametrize("text", [
    "Hello! How can I help you today?",
    "a < b and b > c; x[0] = {1}",
    "The answer is {x | x > 2}.",
    "Use <tools> or [TOOLS] or <|python|>.",
    "",
    "   \n",
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_text_without_calls_passes_through(fmt: ToolFormat, text: str) -> None:
    assert_streams_to(fmt, text, [text] if text else [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_text_is_held_only_while_it_may_start_a_marker(fmt: ToolFormat) -> None:
    marker = dict(zip(FORMATS, MARKERS, strict=True))[fmt]
    text = "Sure, here <is> [the] plan: {step 1} | step 2; <tool [TOOL <|python done."
    parser = ToolCallParser(fmt, TOOLS)
    shown = ""
    for i, char in enumerate(text, 1):
        shown += "".join(e for e in parser.feed(char) if isinstance(e, str))
        held = text[len(shown):i]
        assert text[:i].startswith(shown)
        assert held == "" or (marker.startswith(held) and held != marker), (text[:i], held)
    assert shown + "".join(e for e in parser.finish() if isinstance(e, str)) == text


def test_held_text_that_is_no_marker_is_content() -> None:
    assert_streams_to("hermes", "<tools>\n<tool_calls>", ["<tools>\n<tool_calls>"])
    assert_streams_to("hermes", "I end on <tool_cal", ["I end on <tool_cal"])
    assert_streams_to("llama3", "<|python_ta", ["<|python_ta"])
    assert_streams_to("mistral", "[TOOL_CALL] done", ["[TOOL_CALL] done"])


@pytest.mark.parametrize(("fmt", "text"), [
    ("hermes", 'Here: <tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>'),
    ("llama3", '{"name": "delete_everything", "parameters": {}}'),
    ("llama3", '<|python_tag|>{"name": "delete_everything", "parameters": {}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "delete_everything", "arguments": {}}]'),
    ("mistral", "[TOOL_CALLS]delete_everything[ARGS]{}"),
    ("mistral", "[TOOL_CALLS]get[ARGS]{}"),
    ("mistral", '[{"name": "delete_everything", "arguments": {}}]'),
])
def test_unknown_tool_is_content_as_written(fmt: ToolFormat, text: str) -> None:
    assert_streams_to(fmt, text, [text])


@pytest.mark.parametrize(("fmt", "text"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'),
    ("hermes", '<tool_call>get_weather(city="Paris")</tool_call>'),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}]'),
    ("llama3", '<|python_tag|>print("hello")'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"'),
    ("mistral", "[TOOL_CALLS]get_weather is what I would call"),
])
def test_invalid_or_unfinished_json_is_content_as_written(fmt: ToolFormat, text: str) -> None:
    assert_streams_to(fmt, text, [text])


@pytest.mark.parametrize(("fmt", "text"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": ["get_weather"], "arguments": {}}\n</tool_call>'),
    ("llama3", '{"name": "get_weather", "parameters": "Paris"}'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]"Paris"'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}, {"name": "nope", "arguments": {}}]'),
])
def test_arguments_that_are_no_object_make_no_call(fmt: ToolFormat, text: str) -> None:
    assert_streams_to(fmt, text, [text])


@pytest.mark.parametrize(("fmt", "text"), [
    ("hermes", 'Let me see.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    ("hermes", "Let me see.\n<tool_call>\n"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Par'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"na'),
    ("mistral", "[TOOL_CALLS]get_weath"),
    ("mistral", "[TOOL_CALLS]get_weather[AR"),
])
def test_call_cut_off_at_the_end_is_content_as_written(fmt: ToolFormat, text: str) -> None:
    assert_streams_to(fmt, text, [text])


def test_second_call_cut_off_at_the_end_is_content_after_the_first() -> None:
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_ti'
    assert_streams_to("llama3", text, [call("get_weather", city="Paris"), '; {"name": "get_ti'])


def test_hermes_call_missing_only_its_closing_tag_at_the_end_counts() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_'
    assert_streams_to("hermes", text, [call("get_time")])


def test_braces_quotes_and_markers_inside_strings() -> None:
    text = r'He said "}" and "{": a \"}\" b [<tool_call>] \\'
    arguments = {"text": text, "nested": {"list": [1, {"a": "]"}], "empty": {}}, "n": -1.5e3}
    call_text = json.dumps({"name": "echo", "arguments": arguments})
    expected: list[Event] = [ParsedCall("echo", json.dumps(arguments, separators=(",", ":")))]
    assert_streams_to("hermes", f"<tool_call>{call_text}</tool_call>", expected)
    assert_streams_to("llama3", call_text.replace('"arguments"', '"parameters"'), expected)
    assert_streams_to("mistral", f"[{call_text}]", expected)
    assert_streams_to("mistral", f"[TOOL_CALLS]echo[ARGS]{json.dumps(arguments)}", expected)


def test_unicode_arguments_are_kept_as_characters() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Z\\u00fcrich", "alt": "東京 🌧"}}</tool_call>'
    assert_streams_to("hermes", text, [ParsedCall("get_weather", '{"city":"Zürich","alt":"東京 🌧"}')])


def test_arguments_given_as_a_json_string_are_normalised() -> None:
    text = '{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}'
    assert_streams_to("llama3", text, [call("get_weather", city="Paris")])


@pytest.mark.parametrize("text", [
    "{not json} hi",
    '{"city": "Paris", "temperature": 21}',
    '{"city": "Paris"} is the JSON you asked for.',
    "  {}",
    '{"name": "get_weather"}',
    '{"a": "unclosed',
])
def test_leading_brace_that_is_no_call_is_content(text: str) -> None:
    assert_streams_to("llama3", text, [text])


@pytest.mark.parametrize("text", ["[1, 2, 3] are the numbers", "[link](https://example.com)", "[]", "[{}]",
                                  '[{"name": "get_weather", "arguments": {}}, 3]'])
def test_leading_bracket_that_is_no_call_list_is_content(text: str) -> None:
    assert_streams_to("mistral", text, [text])


def test_what_cannot_be_a_call_is_released_at_once() -> None:
    assert ToolCallParser("llama3", TOOLS).feed("{not") == ["{not"]
    assert ToolCallParser("mistral", TOOLS).feed("[link") == ["[link"]
    assert ToolCallParser("hermes", TOOLS).feed("<tool_call>get_weather(") == ["<tool_call>get_weather("]
    assert ToolCallParser("mistral", TOOLS).feed("[TOOL_CALLS]get_weather is") == ["[TOOL_CALLS]get_weather is"]


def test_llama3_calls_one_after_another_without_the_tag() -> None:
    expected = call("get_weather", city="San Francisco", unit="fahrenheit")
    assert_streams_to("llama3", f"{LLAMA_BARE}\n{LLAMA_BARE}", [expected, expected])


def test_mistral_marker_before_one_call_object() -> None:
    assert_streams_to("mistral", '[TOOL_CALLS] {"name": "get_time", "arguments": {}}', [call("get_time")])


def test_brace_after_text_is_no_call() -> None:
    text = "Try this: " + LLAMA_BARE
    assert_streams_to("llama3", text, [text])


def test_whitespace_between_and_after_calls_is_dropped_but_text_after_a_call_is_content() -> None:
    one = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert_streams_to("hermes", f"\n{one}\n\n{one}\n", [call("get_time"), call("get_time")])
    assert_streams_to("hermes", f"{one}\n ok", [call("get_time"), "\n ok"])
    assert_streams_to("hermes", f"{one}\n<tool", [call("get_time"), "\n<tool"])
    assert_streams_to("llama3", LLAMA_BARE + " and that is it",
                      [call("get_weather", city="San Francisco", unit="fahrenheit"), " and that is it"])
    assert_streams_to("llama3", LLAMA_BARE + "; done",
                      [call("get_weather", city="San Francisco", unit="fahrenheit"), "; done"])


def test_a_bad_call_does_not_stop_the_next_one() -> None:
    text = ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "echo", "arguments": {"text": "ok"}}</tool_call>')
    assert_streams_to("hermes", text, [text[:text.index("\n") + 1], call("echo", text="ok")])
    text = "[TOOL_CALLS]get_weather oops [TOOL_CALLS]get_time[ARGS]{}"
    assert_streams_to("mistral", text, ["[TOOL_CALLS]get_weather oops ", call("get_time")])


def test_without_tools_every_call_is_content() -> None:
    assert_streams_to("hermes", QWEN_TWO_CALLS, [QWEN_TWO_CALLS], tools=[])
    assert_streams_to("mistral", MISTRAL_ARGS, [MISTRAL_ARGS], tools=[])


def test_feeding_one_character_at_a_time_takes_linear_time() -> None:
    # a long call fed a character at a time: the last characters must cost what the first ones did
    arguments = {"text": 'a{"\\"}b ' * 20_000}
    text = f'<tool_call>{{"name": "echo", "arguments": {json.dumps(arguments)}}}</tool_call>'
    parser = ToolCallParser("hermes", TOOLS)
    chunk = 2_000
    seconds = []
    for start in range(0, len(text), chunk):
        began = time.perf_counter()
        for char in text[start:start + chunk]:
            parser.feed(char)
        seconds.append(time.perf_counter() - began)
    assert parser.calls == [ParsedCall("echo", json.dumps(arguments, separators=(",", ":")))]
    first, last = min(seconds[:10]), min(seconds[-11:-1])
    assert last < 3 * first, (first, last)


TEXT_CHARS = st.text(alphabet=st.sampled_from(list("<>[]{}|\"\\;:, \nabTOLS_ctp/")) | st.characters(), max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=TEXT_CHARS, cuts=st.lists(st.integers(0, 60), max_size=6))
def test_random_text_without_markers_passes_through_unchanged(text: str, cuts: list[int]) -> None:
    assume(not any(marker in text for marker in MARKERS))
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    for fmt in FORMATS:
        assert parse(fmt, pieces) == ([text] if text else [])


@settings(max_examples=150, deadline=None)
@given(before=TEXT_CHARS, after=TEXT_CHARS, text=st.text(max_size=20), cut=st.integers(0, 200))
def test_random_text_around_a_call(before: str, after: str, text: str, cut: int) -> None:
    assume(not any(marker in before + after for marker in MARKERS))
    assume(before.strip(" \t\n\r") and after.strip(" \t\n\r"))  # whitespace alone next to a call is dropped
    answer = f"{before}<tool_call>{json.dumps({'name': 'echo', 'arguments': {'text': text}})}</tool_call>{after}"
    cut = min(cut, len(answer))
    assert parse("hermes", [answer[:cut], answer[cut:]]) == [before, call("echo", text=text), after]
