"""In-process publish/subscribe for the control API's server-sent event stream (`/v1/control/events`).

Publishers (the telemetry job, the policy job, the control API) call `EventHub.publish(kind, data)`;
each subscriber (one SSE client) has a bounded queue of its own. A slow subscriber never blocks a
publisher: when its queue is full the oldest event is dropped, and counted in `Subscription.dropped`.

`publish` may be called from any thread: a subscriber belongs to the event loop it was created on,
and an event for it from another thread is handed over with `call_soon_threadsafe`.
`publish_threadsafe(loop, kind, data)` schedules the whole publish on `loop` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

Event = tuple[str, dict[str, Any]]


def jsonable(value: Any) -> Any:
    """`value` as JSON data: NaN and ±inf become None (JSON has neither), unknown objects their str."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    try:
        f = float(value)        # numpy scalars and the like
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def sse_message(kind: str, data: Mapping[str, Any]) -> str:
    """One server-sent event: `event: <kind>`, `data: <json on one line>`, blank line."""
    return f"event: {kind}\ndata: {json.dumps(jsonable(data), separators=(',', ':'))}\n\n"


class Subscription:
    """One subscriber's bounded queue; an async iterator of (kind, data). Close it (or use it as an
    async context manager) to unsubscribe."""

    def __init__(self, hub: EventHub, maxsize: int, loop: asyncio.AbstractEventLoop) -> None:
        self._hub, self.loop = hub, loop
        self._queue: deque[Event] = deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = 0            # events discarded because this subscriber fell behind

    def _deliver(self, event: Event) -> None:     # on self.loop only
        if self.closed:
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1                       # the deque discards the oldest itself
        self._queue.append(event)
        self._ready.set()

    def _end(self) -> None:                        # on self.loop only
        self.closed = True
        self._ready.set()

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None when `timeout` seconds pass without one. Raises StopAsyncIteration
        once the subscription is closed and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._ready.clear()
            if deadline is None:
                await self._ready.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                return None
        return self._queue.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        event = await self.get()
        assert event is not None
        return event

    def close(self) -> None:
        """Unsubscribe; events already queued are discarded."""
        self._hub._remove(self)
        self._queue.clear()
        self.closed = True
        self._ready.set()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Fan-out of (kind, data) events to every current subscriber, dropping the oldest for a slow one."""

    def __init__(self, maxsize: int = 256) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self.published = 0

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def subscribe(self, maxsize: int | None = None) -> Subscription:
        """A new subscription on the running event loop; it receives every event published from now on."""
        sub = Subscription(self, maxsize or self.maxsize, asyncio.get_running_loop())
        with self._lock:
            self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, kind: str, data: Mapping[str, Any]) -> None:
        """Hand (kind, data) to every subscriber. Never blocks; callable from any thread."""
        event = (kind, dict(data))
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with self._lock:
            subs = list(self._subs)
            self.published += 1
        for sub in subs:
            if sub.loop is running:
                sub._deliver(event)
                continue
            try:
                sub.loop.call_soon_threadsafe(sub._deliver, event)
            except RuntimeError:            # its loop is closed: the subscriber is gone
                self._remove(sub)

    def publish_threadsafe(self, loop: asyncio.AbstractEventLoop, kind: str, data: Mapping[str, Any]) -> None:
        """Schedule `publish(kind, data)` on `loop` (from a thread that is not running it)."""
        loop.call_soon_threadsafe(self.publish, kind, dict(data))

    def close(self) -> None:
        """End every subscription (their iterators stop once drained), e.g. at shutdown so that open
        SSE streams finish."""
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(RuntimeError):     # its loop is closed
                sub.loop.call_soon_threadsafe(sub._end)
