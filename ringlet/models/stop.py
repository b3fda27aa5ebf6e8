"""Stop strings over a text stream: never emit a stop string, even when it arrives split across tokens."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # text held back because it may be the start of a stop string
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Add text; return what is safe to show. After a stop string, `stopped` is set."""
        if self.stopped:
            return ""
        buffer = self.pending + text
        hits = [(i, s) for i, s in ((buffer.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped, self.pending = True, ""
            return buffer[:at]
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(buffer)), 0, -1)
                    if buffer.endswith(s[:k])), default=0)
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """At the end of the stream, held-back text was not a stop string after all."""
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text
