"""Per-request records: how each OpenAI API request went, timed where the HTTP layer sees its tokens.

Which requests are recorded: every request that passed validation (well-formed JSON, known fields, this
server's model), however it ends —

- `ok`: the engine finished it (finish reason `stop` or `length`) and the answer was handed over;
- `error`: the engine failed it (finish reason `error`, a 500 to the client) or the handler crashed;
- `aborted`: the client went away mid-stream, or the server cancelled the request (finish reason
  `abort`); the token count is what the handler had received by then. (A client that leaves a
  non-streamed request is not noticed: the request runs to the end and is recorded as `ok`.)
- `rejected`: refused before reaching the engine, by admission control (429) or by the engine's own
  checks (400: prompt too long, token ids out of range), with the message in `error`.

Not recorded: malformed JSON, unknown or invalid fields, an unknown model. Those are a client's bugs,
not served traffic, and a misbehaving client must not be able to fill the table with them.

Latencies (seconds, from one monotonic clock): TTFT from the request's arrival at the handler to the
first generated token reaching it, the gap between consecutive tokens (ITL; tokens of one delta count
as arriving together), and end-to-end from arrival to the final token (or to the abort). Only `ok`
requests feed the Prometheus latency histograms and goodput: an aborted request's "latency" measures
its client, and a failed one's measures the fault.

The last `RECENT_ERRORS` requests that did not end `ok` are also kept in memory (`RequestLog.recent_errors`,
`GET /v1/control/requests`): what an operator looking at the dashboard wants to see first when clients
complain, without a query against the store.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optd.daemon.metrics import Metrics
    from optd.daemon.store import Store
    from optd.engine import Delta

log = logging.getLogger(__name__)

ENDPOINTS = ("completions", "chat")
NOT_OK = ("error", "rejected", "aborted")
RECENT_ERRORS = 50
MAX_ERROR_CHARS = 500               # an engine error can carry a traceback-sized message


@dataclass(frozen=True)
class FinishedRequest:
    request_id: str
    endpoint: str                   # "completions" | "chat"
    streamed: bool
    status: str                     # "ok" | "error" | "aborted" | "rejected"
    finish_reason: str | None       # the engine's: "stop" | "length" | "abort" | "error"; None if rejected
    arrival: float                  # epoch seconds
    finished_at: float              # epoch seconds
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None            # None when no token came
    e2e_s: float
    itl_s: tuple[float, ...] = ()   # every inter-token gap, in order (left out of buffered copies)
    itl_mean_s: float | None = None
    itl_max_s: float | None = None
    knobs: Mapping[str, Any] = field(default_factory=dict)   # in force when it finished
    error: str | None = None

    def store_row(self) -> dict[str, Any]:
        """Keyword arguments for `Store.add_request`."""
        return {"request_id": self.request_id, "arrival": self.arrival, "finished_at": self.finished_at,
                "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
                "endpoint": self.endpoint, "status": self.status, "streamed": self.streamed,
                "itl_mean_s": self.itl_mean_s, "itl_max_s": self.itl_max_s, "knobs": dict(self.knobs),
                "error": self.error}


class RequestTimer:
    """Times one request from its arrival at the handler; feed it every delta as it is received."""

    def __init__(self, endpoint: str, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        self.endpoint = endpoint
        self._clock = clock
        self._start = clock()
        self.arrival = wall()
        self.request_id = ""
        self.streamed = False
        self.prompt_tokens = 0
        self.tokens = 0                       # generated tokens received so far
        self._first: float | None = None
        self._last: float | None = None
        self._gaps: list[float] = []

    def on_delta(self, delta: Delta) -> None:
        n = len(delta.token_ids)
        if delta.prompt_tokens:
            self.prompt_tokens = delta.prompt_tokens
        if n == 0:
            return
        now = self._clock()
        if self._first is None:
            self._first = now
        else:
            self._gaps.append(now - self._last)
        self._gaps.extend([0.0] * (n - 1))    # tokens of one delta arrived together
        self._last = now
        self.tokens += n

    def finish(self, status: str, finish_reason: str | None, *, knobs: Mapping[str, Any] | None = None,
               completion_tokens: int | None = None, error: str | None = None) -> FinishedRequest:
        """The record, as of now. `completion_tokens` (the engine's count, what `usage` reports)
        defaults to the tokens received."""
        end = self._clock()
        gaps = tuple(self._gaps)
        return FinishedRequest(
            request_id=self.request_id, endpoint=self.endpoint, streamed=self.streamed, status=status,
            finish_reason=finish_reason, arrival=self.arrival, finished_at=self.arrival + (end - self._start),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.tokens if completion_tokens is None else completion_tokens,
            ttft_s=None if self._first is None else self._first - self._start, e2e_s=end - self._start,
            itl_s=gaps, itl_mean_s=math.fsum(gaps) / len(gaps) if gaps else None,
            itl_max_s=max(gaps) if gaps else None, knobs=dict(knobs or {}), error=error)


Subscriber = Callable[[FinishedRequest], Any]


class RecentErrors:
    """The last `capacity` requests that did not end `ok` (error, rejected, aborted), newest last, and
    how many of each since start. Fed on the event loop, read from worker threads: hence the lock."""

    def __init__(self, capacity: int = RECENT_ERRORS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._items: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._counts = dict.fromkeys(NOT_OK, 0)
        self._lock = threading.Lock()

    def __call__(self, request: FinishedRequest) -> None:
        if request.status not in NOT_OK:
            return
        message = request.error
        if message is not None and len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS - 1] + "…"
        item = {"ts": request.finished_at, "request_id": request.request_id, "endpoint": request.endpoint,
                "status": request.status, "finish_reason": request.finish_reason, "error": message,
                "streamed": request.streamed, "prompt_tokens": request.prompt_tokens}
        with self._lock:
            self._items.append(item)
            self._counts[request.status] += 1

    def latest(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first, at most `limit` (all kept when None)."""
        with self._lock:
            items = list(self._items)
        items.reverse()
        return items if limit is None else items[:limit]

    def counts(self) -> dict[str, int]:
        """How many requests ended with each non-ok status since start (not only the ones kept)."""
        with self._lock:
            return dict(self._counts)


class RequestLog:
    """Where finished requests go: the latency histograms (`ok` ones), the recent errors (the others),
    the store's batched writer, and any subscribers (the telemetry sampler's `FinishedBuffer`). Called
    on the event loop: nothing here waits for the database (the store only queues the row). A failing
    consumer is logged and never fails the request."""

    def __init__(self, *, store: Store | None = None, metrics: Metrics | None = None,
                 subscribers: Iterable[Subscriber] = ()) -> None:
        self.store, self.metrics = store, metrics
        self.subscribers: list[Subscriber] = list(subscribers)
        self.recent_errors = RecentErrors()
        self.recorded = 0
        self.errors = 0

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def record(self, request: FinishedRequest) -> None:
        self.recorded += 1
        consumers: list[Subscriber] = [self.recent_errors]
        if self.metrics is not None and request.status == "ok":
            consumers.append(lambda r: self.metrics.observe_request(r.ttft_s, r.itl_s, r.e2e_s))
        if self.store is not None:
            consumers.append(lambda r: self.store.add_request(**r.store_row()))
        for consumer in [*consumers, *self.subscribers]:
            try:
                consumer(request)
            except Exception:
                self.errors += 1
                log.exception("request log: recording %s failed", request.request_id)


class FinishedBuffer:
    """The requests finished since the last `drain`, for the telemetry sampler (goodput). Bounded: if
    nobody drains it, the oldest are dropped (and counted). Copies are kept without their per-token gaps."""

    def __init__(self, capacity: int = 65536) -> None:
        self._items: deque[FinishedRequest] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.dropped = 0

    def __call__(self, request: FinishedRequest) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(replace(request, itl_s=()))

    def drain(self) -> list[FinishedRequest]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items
