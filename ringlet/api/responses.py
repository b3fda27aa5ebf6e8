"""OpenAI's Responses API, stateless: `POST /v1/responses` answers with output items (a reasoning item with the
thinking of a model that thinks, a message of output text, and a function_call item per tool call), whole or as the
API's typed server-sent events, so Codex and other Responses clients work against a node."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ringlet.api.anthropic import NAMED_EVENT
from ringlet.api.errors import error_responses, to_api_error
from ringlet.api.facade import node_of
from ringlet.api.generation import Generation, build_task
from ringlet.api.responses_schemas import ResponsesRequest
from ringlet.api.tool_calls import CallReader, Piece
from ringlet.shared.errors import TaskError
from ringlet.shared.tasks import FinishReason, GenerationChunk, ToolCall, Usage

router = APIRouter(prefix="/v1", tags=["openai"])

Json = dict[str, Any]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class _Answer:
    """The response object of one request, as it grows: its output items and, at the end, its status and usage."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body, self.model = body, model
        self.id, self.created_at = _new_id("resp"), time.time()
        self.output: list[Json] = []
        self.status = "in_progress"
        self.usage: Usage | None = None
        self.finish: FinishReason | None = None
        self.message: Json | None = None  # the message item being written, while it is
        self.reasoning: Json | None = None  # the reasoning item being written, while it is

    def response(self) -> Json:
        body = self.body
        tool_choice = body.tool_choice.model_dump() if body.tool_choice is not None and not isinstance(
            body.tool_choice, str) else (body.tool_choice or "auto")
        text_format = (body.text.format.model_dump(by_alias=True, exclude_none=True)
                       if body.text is not None and body.text.format is not None else {"type": "text"})
        usage = None
        if self.usage is not None:
            usage = {"input_tokens": self.usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": self.usage.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": self.usage.total_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": self.status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if self.finish == "length" else None,
            "instructions": body.instructions, "metadata": body.metadata or {}, "output": self.output,
            "parallel_tool_calls": body.parallel_tool_calls is not False, "temperature": body.temperature,
            "top_p": body.top_p, "max_output_tokens": body.max_output_tokens, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()], "text": {"format": text_format},
            "store": False, "usage": usage,
            "reasoning": body.reasoning.model_dump(exclude_none=True) if body.reasoning is not None else None,
        }

    def finished(self, chunk: GenerationChunk) -> None:
        self.finish, self.usage = chunk.finish_reason, chunk.usage
        self.status = "incomplete" if chunk.finish_reason == "length" else "completed"


def _message(text: str, status: str) -> Json:
    return {"type": "message", "id": _new_id("msg"), "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else []}


def _reasoning(text: str, status: str) -> Json:
    """The thinking, whole, as the item's reasoning text (no summary is written)."""
    return {"type": "reasoning", "id": _new_id("rs"), "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _function_call(call: ToolCall, status: str) -> Json:
    return {"type": "function_call", "id": _new_id("fc"), "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


@router.post("/responses", response_model=None, responses={**error_responses(400, 404, 413, 429, 500, 503), 200: {
    "description": "the response object, or with `stream: true` its typed events (`event: TYPE`, `data: {json}`)",
    "content": {"application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": NAMED_EVENT}}}})
async def create_response(body: ResponsesRequest, request: Request) -> JSONResponse | StreamingResponse:
    """A response to a whole conversation (no state is kept); `stream: true` streams the API's typed events."""
    choice = body.constraint()
    task = build_task(body.to_task, choice[0] if choice else None)
    generation = await Generation.start(node_of(request), task, request, api="openai")
    reader = CallReader(body.tool_mode(), body.tool_specs(), generation.tool_format(), body.named_function(),
                        generation.thinking_splitter())
    answer = _Answer(body, generation.model)
    if body.stream:
        return StreamingResponse(_events(generation, reader, answer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, last = [], None
    async for chunk in generation.chunks(watch_disconnect=True):
        text.append(chunk.text)
        last = chunk
    assert last is not None
    piece = reader.read("".join(text), last=True)
    content = piece.content
    if piece.thinking:
        answer.output.append(_reasoning(piece.thinking, "completed"))
    if content or not reader.calls:
        answer.output.append(_message(content, "completed"))
    answer.output += [_function_call(call, "completed") for call in reader.calls]
    answer.finished(last)
    return JSONResponse(answer.response())


class _Events:
    """The typed events of a streamed response, numbered in order."""

    def __init__(self, answer: _Answer) -> None:
        self.answer, self.number = answer, 0
        self.text: list[str] = []  # the open message's text
        self.thought: list[str] = []  # the open reasoning item's text
        self.call: Json | None = None  # the function_call item being written (a named function's arguments stream)

    def event(self, kind: str, **fields: object) -> str:
        payload = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def piece(self, piece: Piece) -> list[str]:
        out = []
        if piece.thinking:
            if self.answer.reasoning is None:
                reasoning = _reasoning("", "in_progress")
                self.answer.reasoning, self.thought = reasoning, []
                self.answer.output.append(reasoning)
                out.append(self.event("response.output_item.added", output_index=len(self.answer.output) - 1,
                                      item=reasoning))
                out.append(self.event("response.content_part.added", item_id=reasoning["id"],
                                      output_index=len(self.answer.output) - 1, content_index=0,
                                      part={"type": "reasoning_text", "text": ""}))
            self.thought.append(piece.thinking)
            out.append(self.event("response.reasoning_text.delta", item_id=self.answer.reasoning["id"],
                                  output_index=len(self.answer.output) - 1, content_index=0, delta=piece.thinking))
        if piece.content:
            if self.answer.message is None:
                out += self._close_reasoning() + self._close_call()
                message = _message("", "in_progress")
                self.answer.message, self.text = message, []
                self.answer.output.append(message)
                out.append(self.event("response.output_item.added", output_index=len(self.answer.output) - 1,
                                      item=message))
                out.append(self.event("response.content_part.added", item_id=message["id"],
                                      output_index=len(self.answer.output) - 1, content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
            self.text.append(piece.content)
            out.append(self.event("response.output_text.delta", item_id=self.answer.message["id"],
                                  output_index=len(self.answer.output) - 1, content_index=0, delta=piece.content,
                                  logprobs=[]))
        for delta in piece.deltas:
            if delta.id is not None:
                out += self._close_reasoning() + self._close_message() + self._close_call()
                assert delta.name is not None
                self.call = _function_call(ToolCall(id=delta.id, name=delta.name, arguments=""), "in_progress")
                self.answer.output.append(self.call)
                out.append(self.event("response.output_item.added", output_index=len(self.answer.output) - 1,
                                      item=self.call))
            if delta.arguments and self.call is not None:
                self.call["arguments"] += delta.arguments
                out.append(self.event("response.function_call_arguments.delta", item_id=self.call["id"],
                                      output_index=len(self.answer.output) - 1, delta=delta.arguments))
        return out

    def close(self) -> list[str]:
        """The end of the answer: the open item is done (an answer with no message or call has an empty message)."""
        out = self._close_reasoning() + self._close_message() + self._close_call()
        if all(item["type"] == "reasoning" for item in self.answer.output):
            message, index = _message("", "completed"), len(self.answer.output)
            self.answer.output.append(message)
            out += [self.event("response.output_item.added", output_index=index,
                               item={**message, "status": "in_progress"}),
                    self.event("response.output_item.done", output_index=index, item=message)]
        return out

    def _close_reasoning(self) -> list[str]:
        reasoning = self.answer.reasoning
        if reasoning is None:
            return []
        index, text = self.answer.output.index(reasoning), "".join(self.thought)
        part = {"type": "reasoning_text", "text": text}
        reasoning.update(status="completed", content=[part])
        self.answer.reasoning = None
        return [self.event("response.reasoning_text.done", item_id=reasoning["id"], output_index=index,
                           content_index=0, text=text),
                self.event("response.content_part.done", item_id=reasoning["id"], output_index=index,
                           content_index=0, part=part),
                self.event("response.output_item.done", output_index=index, item=reasoning)]

    def _close_message(self) -> list[str]:
        message = self.answer.message
        if message is None:
            return []
        index, text = self.answer.output.index(message), "".join(self.text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        message.update(status="completed", content=[part])
        self.answer.message = None
        return [self.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=index, item=message)]

    def _close_call(self) -> list[str]:
        call = self.call
        if call is None:
            return []
        index = self.answer.output.index(call)
        call["status"], self.call = "completed", None
        return [self.event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                           name=call["name"], arguments=call["arguments"]),
                self.event("response.output_item.done", output_index=index, item=call)]


async def _events(generation: Generation, reader: CallReader, answer: _Answer) -> AsyncIterator[str]:
    events = _Events(answer)
    yield events.event("response.created", response=answer.response())
    yield events.event("response.in_progress", response=answer.response())
    try:
        async for chunk in generation.chunks(watch_disconnect=False):
            last = chunk.finish_reason is not None
            for event in events.piece(reader.read(chunk.text, last=last)):
                yield event
            if last:
                for event in events.close():
                    yield event
                answer.finished(chunk)
        kind = "response.incomplete" if answer.status == "incomplete" else "response.completed"
        yield events.event(kind, response=answer.response())
    except TaskError as failure:  # the status is sent already: the failure is the stream's last event
        error = to_api_error(failure)
        answer.status = "failed"
        failed = {**answer.response(), "error": {"code": error.code or "server_error", "message": error.message}}
        yield events.event("response.failed", response=failed)
