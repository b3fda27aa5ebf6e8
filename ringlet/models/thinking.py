"""Thinking, read out of an answer as it streams: a model that thinks before it answers (Qwen3, QwQ, DeepSeek-R1)
writes `<think>` ... `</think>` and then its answer; the splitter parts the text into thinking and answer, piece by
piece, never letting a half-written marker through as either.

Only a think block at the very start counts (whitespace aside). Where the prompt itself ends inside `<think>`
(DeepSeek-R1's template, Qwen3's thinking-only models), the answer starts in thinking and a repeated `<think>` is
dropped. The thinking comes without the whitespace around it, the answer without the whitespace that follows
`</think>`. Which models think, and whether their prompt opens the block, is read once at load from the chat
template and vocabulary (`thinking_format`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from ringlet.shared.tasks import TextGenerationTask, ThinkingFormat

log = logging.getLogger(__name__)

OPEN, CLOSE = "<think>", "</think>"
_WS = " \t\n\r"
_PROBE = [{"role": "user", "content": "What is 1 + 1?"}]  # a conversation to render the generation prompt with

_Phase = Literal["start", "thinking", "after", "answer"]


class ThinkingSplitter:
    """Feed the answer's text in pieces; each call gives the (thinking, answer) text it can tell apart so far."""

    def __init__(self, inside: bool) -> None:
        """`inside`: the prompt opened the think block, so the answer starts in thinking."""
        self.inside = inside
        self._phase: _Phase = "start"
        self._held = ""  # text that may still turn out to be a marker, or whitespace around the thinking
        self._leading = True  # no thinking text came out yet (whitespace after <think> is dropped)

    def feed(self, text: str) -> tuple[str, str]:
        thinking, answer = [], []
        text, self._held = self._held + text, ""
        while text:
            if self._phase == "start":
                rest = text.lstrip(_WS)
                if not rest or (len(rest) < len(OPEN) and OPEN.startswith(rest)):
                    self._held = text  # it may still open the block
                    break
                if rest.startswith(OPEN):
                    self._phase, text = "thinking", rest[len(OPEN):]
                elif self.inside:
                    self._phase = "thinking"
                else:
                    self._phase = "answer"
            elif self._phase == "thinking":
                if self._leading:
                    text = text.lstrip(_WS)
                    if not text:
                        break
                    self._leading = False
                end = text.find(CLOSE)
                if end >= 0:
                    thinking.append(text[:end].rstrip(_WS))
                    self._phase, text = "after", text[end + len(CLOSE):]
                    continue
                keep = len(text) - _marker_start(text, CLOSE)
                keep = len(text[:keep].rstrip(_WS))  # whitespace before </think> is not part of the thinking
                thinking.append(text[:keep])
                self._held = text[keep:]
                break
            elif self._phase == "after":
                text = text.lstrip(_WS)
                if text:
                    self._phase = "answer"
            else:
                answer.append(text)
                break
        return "".join(thinking), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """The answer ended: what was held back comes out (a block never closed is all thinking)."""
        held, self._held = self._held, ""
        if self._phase == "start":
            return (held.strip(_WS), "") if self.inside else ("", held)
        if self._phase == "thinking":
            return held.rstrip(_WS) if not self._leading else "", ""
        return "", ""


def _marker_start(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is the start of `marker`, cut short."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def splitter_for(thinking: ThinkingFormat | None, task: TextGenerationTask) -> ThinkingSplitter | None:
    """The splitter of a task's answer: None when the model does not think, the prompt is raw (no template), or a
    grammar holds the whole answer."""
    if thinking is None or task.messages is None or task.sampling.constraint is not None:
        return None
    return ThinkingSplitter(inside=thinking.opened(task.thinking_switch))


class TemplateTokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def _opens(tokenizer: TemplateTokenizer, **switch: bool) -> bool:
    """Whether the generation prompt ends inside a think block, the template's switch set as given."""
    try:
        prompt = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, **switch)
    except ValueError as error:  # a template that needs more than one user message: it does not open the block
        log.info("the chat template did not render a probe conversation (%s); taking it as not opening <think>", error)
        return False
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def thinking_format(tokenizer: TemplateTokenizer) -> ThinkingFormat | None:
    """How the model writes its thinking, or None when it does not think: its template or vocabulary knows
    `</think>`, and the marker survives decoding (a marker decoded away as a special token could not be read back)."""
    template = tokenizer.chat_template or ""
    ids = tokenizer.encode(CLOSE, add_special_tokens=False)
    if CLOSE not in template and len(ids) != 1:
        return None
    if tokenizer.decode(ids, skip_special_tokens=True) != CLOSE:
        log.warning("the model's vocabulary has %s as a special token that decoding drops; its thinking is not "
                    "separated from its answer", CLOSE)
        return None
    switch = "enable_thinking" in template
    by_default = _opens(tokenizer)
    return ThinkingFormat(switch=switch, opened_by_default=by_default,
                          opened_when_on=_opens(tokenizer, enable_thinking=True) if switch else by_default,
                          opened_when_off=_opens(tokenizer, enable_thinking=False) if switch else by_default)
