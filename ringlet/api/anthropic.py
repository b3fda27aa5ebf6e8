"""Anthropic's Messages API: `POST /v1/messages` (whole, or streamed as Anthropic's named server-sent events) and
`POST /v1/messages/count_tokens`, so Claude Code and other Anthropic clients work against a node. Text and tool calls
(`tool_use` blocks, read out of the answer as the OpenAI adapter reads them) come back as content blocks, after the
`thinking` block of a model that thinks when the request enables thinking."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ringlet.api.anthropic_schemas import (
    CountTokensOut,
    CountTokensRequest,
    MessageOut,
    MessagesRequest,
    StopReason,
    TextOut,
    ThinkingOut,
    ToolUseOut,
    UsageOut,
    signature,
)
from ringlet.api.errors import anthropic_error, error_responses, to_api_error
from ringlet.api.facade import node_of
from ringlet.api.generation import Generation, build_task
from ringlet.api.tool_calls import CallReader, Piece
from ringlet.shared.errors import TaskError
from ringlet.shared.tasks import GenerationChunk, ToolCall

router = APIRouter(prefix="/v1", tags=["anthropic"])

GENERATION_ERRORS = error_responses(400, 404, 413, 429, 500, 503)
# one server-sent event: its type, and its JSON
NAMED_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "object"}}}}
STREAM_DOCS: dict[int | str, dict[str, object]] = {200: {
    "description": "the message, or with `stream: true` Anthropic's named events (`event: TYPE`, `data: {json}`)",
    "content": {"text/event-stream": {"schema": NAMED_EVENT}}}}


def _stop_reason(finish: str | None, stop_sequence: str | None, calls: list[ToolCall]) -> StopReason | None:
    if finish == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence else "end_turn"


def _tool_use(call: ToolCall) -> ToolUseOut | None:
    """The call as a block; None when its arguments are not an object (cut off by max_tokens)."""
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:
        return None
    return ToolUseOut(id=call.id, name=call.name, input=arguments) if isinstance(arguments, dict) else None


def _event(kind: str, payload: dict[str, object]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"


async def _generate(request: Request, body: MessagesRequest | CountTokensRequest) -> tuple[Generation, CallReader]:
    choice = body.constraint()
    task = build_task(body.to_task, choice[0] if choice else None)
    generation = await Generation.start(node_of(request), task, request, api="anthropic")
    reader = CallReader(body.tool_mode(), body.tool_specs(), generation.tool_format(),
                        body.named_tool() if body.tool_mode() == "named" else None, generation.thinking_splitter())
    return generation, reader


@router.post("/messages", response_model=MessageOut, responses={**GENERATION_ERRORS, **STREAM_DOCS})
async def messages(body: MessagesRequest, request: Request) -> MessageOut | StreamingResponse:
    """Anthropic's Messages API; `stream: true` streams its named events (message_start ... message_stop)."""
    generation, reader = await _generate(request, body)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(_events(generation, reader, message_id, body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    text: list[str] = []
    last: GenerationChunk | None = None
    async for chunk in generation.chunks(watch_disconnect=True):
        text.append(chunk.text)
        last = chunk
    assert last is not None and last.usage is not None
    piece = reader.read("".join(text), last=True)
    content = piece.content
    uses: list[ToolUseOut] = []
    calls = []
    for call in reader.calls:
        block = _tool_use(call)
        if block is None:  # an unfinished call: the text it was
            content += call.arguments
        else:
            uses.append(block)
            calls.append(call)
    blocks: list[ThinkingOut | TextOut | ToolUseOut] = []
    if piece.thinking and body.thinks():  # thinking the request did not enable is left out, as Anthropic's would be
        blocks.append(ThinkingOut.of(piece.thinking, body.shows_thinking()))
    blocks += [TextOut(text=content)] if content or not uses else []
    blocks += uses
    return MessageOut(id=message_id, model=generation.model, content=blocks,
                      stop_reason=_stop_reason(last.finish_reason, last.stop_sequence, calls),
                      stop_sequence=last.stop_sequence,
                      usage=UsageOut(input_tokens=last.usage.prompt_tokens, output_tokens=last.usage.completion_tokens))


class _Blocks:
    """The content blocks of a streamed answer: a thinking block opened by thinking (when the request enables it), a
    text block by text, a tool_use block by each call; one open at a time, as Anthropic streams them. A thinking
    block gets its signature just before it closes."""

    def __init__(self, thinking: bool, shown: bool) -> None:
        self.index = -1
        self.open: str | None = None  # the type of the block open now
        self.thinking, self.shown = thinking, shown
        self._thought: list[str] = []  # the open thinking block's text

    def events(self, piece: Piece) -> list[str]:
        out = []
        if piece.thinking and self.thinking:
            if self.open != "thinking":
                out += self._start({"type": "thinking", "thinking": "", "signature": ""})
            self._thought.append(piece.thinking)
            if self.shown:
                out.append(_event("content_block_delta", {
                    "index": self.index, "delta": {"type": "thinking_delta", "thinking": piece.thinking}}))
        if piece.content:
            if self.open != "text":
                out += self._start({"type": "text", "text": ""})
            out.append(_event("content_block_delta", {"index": self.index,
                                                      "delta": {"type": "text_delta", "text": piece.content}}))
        for delta in piece.deltas:
            if delta.id is not None:
                out += self._start({"type": "tool_use", "id": delta.id, "name": delta.name, "input": {}})
            if delta.arguments:
                out.append(_event("content_block_delta", {
                    "index": self.index, "delta": {"type": "input_json_delta", "partial_json": delta.arguments}}))
        return out

    def finish(self) -> list[str]:
        """The end of the answer: the open block closes (an answer without any has an empty text block)."""
        return (self._start({"type": "text", "text": ""}) if self.index < 0 else []) + self._close()

    def _start(self, block: dict[str, object]) -> list[str]:
        out = self._close()
        self.index, self.open = self.index + 1, str(block["type"])
        return [*out, _event("content_block_start", {"index": self.index, "content_block": block})]

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(_event("content_block_delta", {"index": self.index, "delta": {
                "type": "signature_delta", "signature": signature("".join(self._thought))}}))
            self._thought = []
        self.open = None
        return [*out, _event("content_block_stop", {"index": self.index})]


async def _events(generation: Generation, reader: CallReader, message_id: str,
                  body: MessagesRequest) -> AsyncIterator[str]:
    start = MessageOut(id=message_id, model=generation.model, content=[], stop_reason=None,
                       usage=UsageOut(input_tokens=0, output_tokens=0))
    yield _event("message_start", {"message": start.model_dump()})
    yield _event("ping", {})
    blocks = _Blocks(body.thinks(), body.shows_thinking())
    try:
        async for chunk in generation.chunks(watch_disconnect=False):
            last = chunk.finish_reason is not None
            for event in blocks.events(reader.read(chunk.text, last=last)):
                yield event
            if last:
                for event in blocks.finish():
                    yield event
                usage = chunk.usage
                yield _event("message_delta", {
                    "delta": {"stop_reason": _stop_reason(chunk.finish_reason, chunk.stop_sequence, reader.calls),
                              "stop_sequence": chunk.stop_sequence},
                    "usage": {"input_tokens": usage.prompt_tokens if usage else 0,
                              "output_tokens": usage.completion_tokens if usage else 0}})
        yield _event("message_stop", {})
    except TaskError as failure:  # the status is sent already: Anthropic reports errors as an event
        yield _event("error", {"error": anthropic_error(to_api_error(failure))})


@router.post("/messages/count_tokens", response_model=CountTokensOut, responses=GENERATION_ERRORS)
async def count_tokens(body: CountTokensRequest, request: Request) -> BaseModel:
    """The prompt's tokens as the model's chat template and tokenizer make them (the runner renders the prompt and
    computes one token, which is not returned)."""
    generation, _ = await _generate(request, body)
    usage = None
    async for chunk in generation.chunks(watch_disconnect=True):
        usage = chunk.usage or usage
    assert usage is not None
    return CountTokensOut(input_tokens=usage.prompt_tokens)
