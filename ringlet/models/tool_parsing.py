"""Tool calls read back from a chat model's answer as it streams: the text splits into content and calls, content
comes out as soon as it cannot be part of a call, and a call once its text is complete, so a half-written call
never shows as content.

The formats (the engine decodes with special tokens skipped, so a marker may be missing from the text):
- hermes (Qwen 2.5/3, Hermes, ringlet's own instructions): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- llama3: `<|python_tag|>{"name": ..., "parameters": {...}}`, several joined by `;`; or the object alone;
- mistral: `[TOOL_CALLS]` then a JSON array of calls, or `name[ARGS]{...}` per call; or the array alone.
A marker-less call counts only at the start of the answer or right after another call (whitespace aside). A call
counts only when it names a known tool and its arguments are an object; anything else is content, exactly as
written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from ringlet.shared.tasks import ToolFormat


@dataclass(frozen=True)
class ParsedCall:
    """A call the model made to one of its tools."""

    name: str
    arguments: str  # the arguments object as compact JSON text


Event = str | ParsedCall

_Phase = Literal["text", "json", "close", "head", "name", "args"]
_Kind = Literal["hermes", "object", "calls", "args"]  # what the JSON value being read must be

_MARKERS: dict[ToolFormat, str] = {"hermes": "<tool_call>", "llama3": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}
_CLOSE = "</tool_call>"
_ARGS = "[ARGS]"
# what opens a call written without its marker
_BARE: dict[ToolFormat, str] = {"hermes": "", "llama3": "{", "mistral": "["}
_WS = " \t\n\r"
_NAME = re.compile(r"[\w.:\-]+")
_IN_STRING = re.compile(r'["\\]')
# outside strings, the characters that matter: brackets, quotes, and any that JSON never has there
_OUTSIDE = re.compile(r"[^ \t\n\r,:0-9eE+\-.truefalsn]")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _may_become(text: str, pos: int, marker: str) -> bool:
    """Whether text[pos:] is the start of marker, cut short."""
    return len(text) - pos < len(marker) and marker.startswith(text[pos:])


def _marker_start(text: str, pos: int, marker: str) -> int:
    """The length of the longest end of text[pos:] that is the start of marker, cut short."""
    for length in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def _json_value(text: str) -> object:
    """The value text holds, or None when it is not JSON (raw control characters in strings are let through)."""
    try:
        return json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return None


def _arguments(value: object) -> str | None:
    """Arguments as compact JSON text, when they are an object or a string holding one."""
    if isinstance(value, str):
        value = _json_value(value)
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _JsonScanner:
    """Where one JSON object or array ends, read piece by piece: tracks strings, escapes and depth, parses nothing."""

    def __init__(self, openers: str) -> None:
        self.openers = openers  # the characters the value may start with
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str, pos: int) -> tuple[Literal["more", "end", "bad"], int]:
        """Read text[pos:]: ("more", len(text)) while the value goes on, ("end", i) with i just past its last
        character, ("bad", i) when text[i] cannot be part of it."""
        while pos < len(text):
            if self.escaped:
                self.escaped, pos = False, pos + 1
            elif self.in_string:
                found = _IN_STRING.search(text, pos)
                if found is None:
                    break
                pos = found.end()
                if found.group() == "\\":
                    self.escaped = True
                else:
                    self.in_string = False
            elif self.depth == 0:
                pos = _skip_ws(text, pos)
                if pos == len(text):
                    break
                if text[pos] not in self.openers:
                    return "bad", pos
                self.depth, pos = 1, pos + 1
            else:
                found = _OUTSIDE.search(text, pos)
                if found is None:
                    break
                pos, char = found.end(), found.group()
                if char == '"':
                    self.in_string = True
                elif char in "{[":
                    self.depth += 1
                elif char in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        return "end", pos
                else:
                    return "bad", pos - 1
        return "more", len(text)


class ToolCallParser:
    """Splits one answer, fed piece by piece, into content text and the calls it makes."""

    def __init__(self, fmt: ToolFormat, tool_names: Collection[str]) -> None:
        self.fmt = fmt
        self.tool_names = frozenset(tool_names)
        self._marker = _MARKERS[fmt]
        self._longest_name = max(map(len, self.tool_names), default=0)
        self._calls: list[ParsedCall] = []
        self._out: list[Event] = []  # the events of the piece being read
        self._pending = ""  # text not read yet: what may be the start of a marker
        self._phase: _Phase = "text"
        # whitespace since the answer began or the last call, held: a call right after it drops it
        self._gap: list[str] | None = []
        self._raw: list[str] = []  # the call being read, as written: content again if it turns out no call
        self._json_from = 0  # where in _raw its JSON starts
        self._scanner = _JsonScanner("{")
        self._kind: _Kind = "object"
        self._name = ""  # mistral's name[ARGS]{...}: the name
        self._closing: ParsedCall | None = None  # hermes: the call read, before its </tool_call>

    @property
    def calls(self) -> list[ParsedCall]:
        """Every call parsed so far."""
        return list(self._calls)

    def feed(self, text: str) -> list[Event]:
        """The events this piece completes, in order."""
        buffer, pos = self._pending + text, 0
        while pos < len(buffer):
            reached = self._step(buffer, pos)
            if reached is None:
                break
            pos = reached
        self._pending = buffer[pos:]
        return self._take()

    def finish(self) -> list[Event]:
        """The answer ended: what was held comes out, an unfinished call as the text it was."""
        held = self._pending
        if self._phase == "text":
            if self._gap is not None and (held or not self._calls):  # whitespace after the last call is dropped
                self._content("".join(self._gap))
            self._content(held)
        elif self._phase == "close":  # the JSON is whole, only its closing tag was cut off
            assert self._closing is not None
            self._accept([self._closing], 0)
        else:
            self._content("".join(self._raw) + held)
        self._pending, self._raw, self._gap, self._phase = "", [], None, "text"
        return self._take()

    def _take(self) -> list[Event]:
        events, self._out = self._out, []
        return events

    def _content(self, text: str) -> None:
        if not text:
            return
        if self._out and isinstance(self._out[-1], str):
            self._out[-1] += text
        else:
            self._out.append(text)

    def _step(self, text: str, pos: int) -> int | None:
        """Read on from pos: the position reached, or None when what is left may be the start of a marker."""
        match self._phase:
            case "text":
                return self._read_gap(text, pos) if self._gap is not None else self._read_text(text, pos)
            case "json":
                return self._read_json(text, pos)
            case "close":
                return self._read_close(text, pos)
            case "head":
                return self._read_head(text, pos)
            case "name":
                return self._read_name(text, pos)
            case "args":
                return self._read_args_tag(text, pos)

    def _read_text(self, text: str, pos: int) -> int | None:
        found = text.find(self._marker, pos)
        if found >= 0:
            self._content(text[pos:found])
            return self._open_marker(found)
        end = len(text) - _marker_start(text, pos, self._marker)
        if end == pos:
            return None
        self._content(text[pos:end])
        return end

    def _read_gap(self, text: str, pos: int) -> int | None:
        """After the start or a call: whitespace is held until what follows shows whether a call comes next."""
        assert self._gap is not None
        end = _skip_ws(text, pos)
        if end > pos:
            self._gap.append(text[pos:end])
            return end
        if text.startswith(self._marker, pos):
            return self._open_marker(pos)
        if _may_become(text, pos, self._marker):
            return None
        if text[pos] == _BARE[self.fmt]:
            self._open("")
            self._expect_json(text[pos], "object" if self.fmt == "llama3" else "calls")
            return pos
        if text[pos] == ";" and self.fmt == "llama3" and self._calls:
            self._open(";")
            self._expect_json("{", "object")
            return pos + 1
        self._content("".join(self._gap))
        self._gap = None
        return pos

    def _open(self, written: str) -> None:
        """A call may start here: hold what it is written as, and the whitespace before it."""
        self._raw = [*(self._gap or []), written]
        self._gap = None

    def _open_marker(self, pos: int) -> int:
        self._open(self._marker)
        if self.fmt == "mistral":
            self._phase = "head"
        else:
            self._expect_json("{", "hermes" if self.fmt == "hermes" else "object")
        return pos + len(self._marker)

    def _expect_json(self, openers: str, kind: _Kind) -> None:
        self._phase, self._kind = "json", kind
        self._scanner = _JsonScanner(openers)
        self._json_from = len(self._raw)

    def _accept(self, calls: list[ParsedCall], pos: int) -> int:
        self._calls.extend(calls)
        self._out.extend(calls)
        self._raw, self._gap, self._phase = [], [], "text"
        return pos

    def _reject(self, pos: int) -> int:
        """What was held is no call: it is content, as written, and reading goes on from pos as text."""
        self._content("".join(self._raw))
        self._raw, self._phase = [], "text"
        return pos

    def _read_json(self, text: str, pos: int) -> int:
        status, end = self._scanner.scan(text, pos)
        self._raw.append(text[pos:end])
        if status == "more":
            return end
        if status == "bad":
            return self._reject(end)
        calls = self._calls_in(_json_value("".join(self._raw[self._json_from:])))
        if calls is None:
            return self._reject(end)
        if self._kind == "hermes":
            self._closing, self._phase = calls[0], "close"
            return end
        return self._accept(calls, end)

    def _read_close(self, text: str, pos: int) -> int | None:
        end = _skip_ws(text, pos)
        if end > pos:
            self._raw.append(text[pos:end])
            return end
        if text.startswith(_CLOSE, pos):
            assert self._closing is not None
            return self._accept([self._closing], pos + len(_CLOSE))
        if _may_become(text, pos, _CLOSE):
            return None
        return self._reject(pos)

    def _read_head(self, text: str, pos: int) -> int:
        """Right after [TOOL_CALLS]: an array of calls, one call object, or a name and [ARGS]."""
        end = _skip_ws(text, pos)
        if end > pos:
            self._raw.append(text[pos:end])
            return end
        if text[pos] in "[{":
            self._expect_json(text[pos], "calls")
            return pos
        if _NAME.match(text, pos):
            self._phase, self._name = "name", ""
            return pos
        return self._reject(pos)

    def _read_name(self, text: str, pos: int) -> int:
        found = _NAME.match(text, pos)
        if found is not None:
            room = self._longest_name - len(self._name)
            if found.end() - pos > room:  # longer than any tool's name
                self._raw.append(text[pos:pos + room])
                return self._reject(pos + room)
            self._name += found.group()
            self._raw.append(found.group())
            return found.end()
        if text[pos] == "[" and self._name in self.tool_names:
            self._phase = "args"
            return pos
        return self._reject(pos)

    def _read_args_tag(self, text: str, pos: int) -> int | None:
        if text.startswith(_ARGS, pos):
            self._raw.append(_ARGS)
            self._expect_json("{", "args")
            return pos + len(_ARGS)
        if _may_become(text, pos, _ARGS):
            return None
        return self._reject(pos)

    def _calls_in(self, value: object) -> list[ParsedCall] | None:
        """The calls a complete JSON value makes, or None when it is not (all) calls."""
        if self._kind == "args":
            arguments = _arguments(value)
            return None if arguments is None else [ParsedCall(self._name, arguments)]
        if self._kind == "calls" and isinstance(value, list):
            calls = [self._call(item) for item in value]
            return [c for c in calls if c is not None] if calls and None not in calls else None
        call = self._call(value)
        return None if call is None else [call]

    def _call(self, value: object) -> ParsedCall | None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in self.tool_names:
            return None
        arguments = _arguments(value["arguments"] if "arguments" in value else value.get("parameters"))
        return None if arguments is None else ParsedCall(value["name"], arguments)
