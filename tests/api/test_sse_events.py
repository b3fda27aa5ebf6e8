"""A stream's plain text events, written from a template, say exactly what the schema's own JSON says."""

from __future__ import annotations

import json

import pytest

from ringlet.api.openai import _TextEvents
from ringlet.api.openai_schemas import ChatCompletionChunk, ChunkChoice, Completion, CompletionChoice, Delta

TEXTS = ["plain", ' "quoted" \\ back', "line\nbreak\ttab", "é 東京 🍞", "\u2028\u0001", "", str(_TextEvents.INDEX)]


@pytest.mark.parametrize("text", TEXTS)
def test_a_templated_chat_event_is_the_schemas_event(text: str) -> None:
    def chunk(index: int, content: str) -> ChatCompletionChunk:
        return ChatCompletionChunk(id="chatcmpl-1", created=7, model="org/model \"x\"",
                                   choices=[ChunkChoice(index=index, delta=Delta(content=content))])

    events = _TextEvents(chunk(_TextEvents.INDEX, _TextEvents.TEXT))
    assert json.loads(events(3, text)) == json.loads(chunk(3, text).model_dump_json())


@pytest.mark.parametrize("text", TEXTS)
def test_a_templated_completion_event_is_the_schemas_event(text: str) -> None:
    def chunk(index: int, content: str) -> Completion:
        return Completion(id="cmpl-1", created=7, model="m", choices=[CompletionChoice(index=index, text=content)])

    events = _TextEvents(chunk(_TextEvents.INDEX, _TextEvents.TEXT))
    assert json.loads(events(0, text)) == json.loads(chunk(0, text).model_dump_json())
