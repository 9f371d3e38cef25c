"""The MQTT bridge's outgoing queue: bounded, never blocks a producer, drops the oldest telemetry first.

Producers (the telemetry job's subscriber, the event watcher, the command worker) run on the event loop
and call `put`, which returns at once: when the queue is full it discards the oldest telemetry sample,
or, when none is queued, the oldest message of another kind (a stale sample is worth least; a decision
or a command's reply is worth more). The publisher task awaits `get`, which hands out the other kinds
before telemetry. Retained state (`knobs`) is coalesced: a new one replaces the one still queued, so a
reconnect never publishes an older state after a newer one.

Event-loop only: no locks, and `asyncio.Event` is not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

TELEMETRY = "telemetry"
STATE_KINDS = frozenset({"knobs"})      # retained state: only the newest matters


@dataclass(frozen=True, slots=True)
class Outgoing:
    kind: str               # telemetry, decision, knobs, result (the label of the sent/dropped counters)
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


class Outbox:
    def __init__(self, maxsize: int, on_drop: Callable[[Outgoing], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._on_drop = on_drop
        self._telemetry: deque[Outgoing] = deque()
        self._other: deque[Outgoing] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._telemetry) + len(self._other)

    def put(self, msg: Outgoing) -> None:
        """Queue `msg`; never blocks. Makes room by dropping (and reporting) the oldest telemetry first."""
        self._enqueue(msg, front=False)

    def requeue(self, msg: Outgoing) -> None:
        """Put back a message whose publish failed, to go first after the reconnect. A sample is dropped
        instead: by then a newer one is queued."""
        if msg.kind == TELEMETRY:
            self._drop(msg)
        else:
            self._enqueue(msg, front=True)

    def _enqueue(self, msg: Outgoing, front: bool) -> None:
        if msg.kind in STATE_KINDS:
            stale = [m for m in self._other if m.kind == msg.kind]
            if stale and front:
                return                      # a newer state is already queued
            for m in stale:
                self._other.remove(m)
        while len(self) >= self.maxsize:
            self._drop((self._telemetry or self._other).popleft())
        queue = self._telemetry if msg.kind == TELEMETRY else self._other
        if front:
            queue.appendleft(msg)
        else:
            queue.append(msg)
        self._ready.set()

    def _drop(self, msg: Outgoing) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop(msg)

    def get_nowait(self) -> Outgoing | None:
        if self._other:
            return self._other.popleft()
        if self._telemetry:
            return self._telemetry.popleft()
        return None

    async def get(self) -> Outgoing:
        while (msg := self.get_nowait()) is None:
            self._ready.clear()
            await self._ready.wait()
        return msg
