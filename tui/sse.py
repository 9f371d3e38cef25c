"""A server-sent events parser (the WHATWG event-stream format, as much as the daemon uses).

Feed it lines without their line ending; it returns a complete event at each blank line. Comments
(`: keepalive`) and fields other than `event` and `data` are ignored; several `data` lines are joined
with newlines; an event without `event:` is a "message".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SseEvent:
    kind: str
    data: str


@dataclass
class SseParser:
    _kind: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data:
                self._kind = ""
                return None
            event = SseEvent(self._kind or "message", "\n".join(self._data))
            self._kind, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        return None
