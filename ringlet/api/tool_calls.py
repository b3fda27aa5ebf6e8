"""One answer read for tool calls, as the OpenAI and Ollama adapters stream it: its text split into content and
calls, piece by piece, so a call never shows as content.

How the answer is read depends on what the request asked:
- `auto`: the model chose; its calls are in its family's format (`models/tool_parsing.py`), each coming out whole
  once its text is complete;
- a named function: the grammar made the whole answer that function's arguments object, streamed as it comes;
- `required`: the grammar made the answer a JSON array of calls, each coming out once complete;
- no tools, or `none`: everything is content.
A model that thinks writes its thinking first: a `ThinkingSplitter` takes it out before the rest is read for calls."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ringlet.models.thinking import ThinkingSplitter
from ringlet.models.tool_parsing import ParsedCall, ToolCallParser
from ringlet.models.tools import named_call_constraint, required_call_constraint
from ringlet.shared.tasks import Constraint, FunctionSpec, ToolCall, ToolFormat

ToolMode = Literal["none", "auto", "required", "named"]


def forced_call(mode: ToolMode, tools: Sequence[FunctionSpec], named: str | None, parallel: bool) -> Constraint | None:
    """The grammar of a call the request demands: the named function's arguments, or `required`'s array of calls
    (one at most unless `parallel`); None when the model may answer in words."""
    function = next((t for t in tools if t.name == named), None)
    if mode == "named" and function is not None:  # (a name not among the tools is refused by the schemas)
        return named_call_constraint(function)
    return required_call_constraint(list(tools), parallel) if mode == "required" else None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """A stream's news about call `index`: it began (`id` and `name` set), and/or more of its arguments' text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Piece:
    """What one piece of an answer's text turned out to be."""

    content: str = ""
    deltas: list[CallDelta] = field(default_factory=list)
    finished: list[ToolCall] = field(default_factory=list)  # calls whose text completed with this piece
    thinking: str = ""  # the model's thinking, before its answer

    def then(self, later: Piece) -> Piece:
        return Piece(self.content + later.content, self.deltas + later.deltas, self.finished + later.finished,
                     self.thinking + later.thinking)


class CallReader:
    def __init__(self, mode: ToolMode, tools: Sequence[FunctionSpec], fmt: ToolFormat,
                 named: str | None = None, thinking: ThinkingSplitter | None = None) -> None:
        """`named`: the function a `named` request demands; `thinking`: the splitter of a model that thinks."""
        assert (mode == "named") == (named is not None), "a name with the named mode, and only then"
        self.mode, self.named, self.thinking = mode, named, thinking
        self.calls: list[ToolCall] = []
        self._arguments: list[str] = []  # a named call's arguments so far
        names = [t.name for t in tools]
        # the grammar of `required` writes a JSON array of {"name", "arguments"}: Mistral's format without its marker
        self._parser = (ToolCallParser(fmt, names) if mode == "auto"
                        else ToolCallParser("mistral", names) if mode == "required" else None)

    def feed(self, text: str) -> Piece:
        if self.thinking is None:
            return self._answer(text)
        thinking, text = self.thinking.feed(text)
        piece = self._answer(text) if text else Piece()
        piece.thinking = thinking
        return piece

    def _answer(self, text: str) -> Piece:
        if self.mode == "named":
            return self._named(text)
        if self._parser is None:
            return Piece(content=text)
        return self._events(self._parser.feed(text))

    def read(self, text: str, last: bool) -> Piece:
        """`feed`, then `finish` when `text` is the answer's last piece."""
        piece = self.feed(text)
        return piece.then(self.finish()) if last else piece

    def finish(self) -> Piece:
        """The answer ended: whatever was held back comes out (an unfinished call as the text it was)."""
        if self.thinking is not None:
            thinking, text = self.thinking.finish()
            piece = self._answer(text) if text else Piece()
            piece.thinking = thinking
            return piece.then(self._finish_answer())
        return self._finish_answer()

    def _finish_answer(self) -> Piece:
        if self.mode == "named":
            assert self.named is not None
            if not self.calls:  # the answer was empty
                self._named("")
            self.calls[0] = self.calls[0].model_copy(update={"arguments": "".join(self._arguments)})
            return Piece(finished=list(self.calls))
        if self._parser is None:
            return Piece()
        return self._events(self._parser.finish())

    def _named(self, text: str) -> Piece:
        assert self.named is not None
        if not self.calls:
            self.calls.append(ToolCall(id=new_call_id(), name=self.named, arguments=""))
            self._arguments.append(text)
            return Piece(deltas=[CallDelta(0, self.calls[0].id, self.named, text)])
        self._arguments.append(text)
        return Piece(deltas=[CallDelta(0, arguments=text)] if text else [])

    def _events(self, events: list[str | ParsedCall]) -> Piece:
        piece = Piece()
        for event in events:
            if isinstance(event, str):
                piece.content += event
                continue
            call = ToolCall(id=new_call_id(), name=event.name, arguments=event.arguments)
            piece.deltas.append(CallDelta(len(self.calls), call.id, call.name, call.arguments))
            piece.finished.append(call)
            self.calls.append(call)
        return piece
