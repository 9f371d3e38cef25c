"""Keeps a DashboardState in step with the daemon: subscribe to the event stream, read a snapshot once
subscribed (so no event falls between the two), apply events as they come, and when the daemon goes away
say so and try again with exponential backoff. Runs as a Textual worker on the app's event loop; every
wait is an await, so the screen never freezes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from optd.tui.client import ApiError, Unreachable
from optd.tui.source import DataSource
from optd.tui.state import WINDOWS_S, DashboardState, Snapshot

DECISIONS_LIMIT = 200


@dataclass
class Backoff:
    """0.5 s, 1 s, 2 s, ... up to `cap`: a restarting daemon is found within `cap` of being back."""

    first: float = 0.5
    cap: float = 5.0
    _next: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._next = 0.0

    def next(self) -> float:
        self._next = self.first if self._next == 0 else min(self.cap, self._next * 2)
        return self._next


class Feed:
    def __init__(self, source: DataSource, state: DashboardState, changed: Callable[[], None],
                 clock: Callable[[], float] = time.time, backoff: Backoff | None = None) -> None:
        self.source, self.state, self.changed, self.clock = source, state, changed, clock
        self.backoff = backoff or Backoff()
        self._refresh: asyncio.Task | None = None

    async def run(self) -> None:
        while True:
            try:
                # aclosing: a failure here must close the stream now, not when the generator is collected
                async with contextlib.aclosing(self.source.events()) as events:
                    async for kind, data in events:
                        if kind == "connected":
                            self.state.connected(await self.snapshot())
                            self.backoff.reset()
                        elif self.state.apply_event(kind, data):
                            self.refresh_soon()
                        self.changed()
                raise Unreachable("the event stream ended")
            except Exception as e:          # whatever went wrong: say so, and try again
                delay = self.backoff.next()
                if isinstance(e, ApiError):
                    problem = f"the daemon answered {e.status}: {e.message}"
                elif isinstance(e, Unreachable):
                    problem = str(e)
                else:                 # a bug or an answer this version cannot read: still not frozen
                    problem = f"{type(e).__name__}: {e}"
                self.state.disconnected(problem, self.clock() + delay)
                self.changed()
                await asyncio.sleep(delay)

    async def snapshot(self) -> Snapshot:
        s = self.source
        status, info, policy, samples, decisions, ranges, requests = await asyncio.gather(
            s.status(), s.info(), s.policy(), s.telemetry(max(WINDOWS_S)),
            s.decisions(DECISIONS_LIMIT, self.state.knob_filter, self.state.outcome_filter),
            s.knob_ranges(), s.requests())
        return Snapshot(status, info, policy, samples, decisions, ranges, requests)

    async def refresh(self) -> None:
        """Read the status again (pins, pause, engine, policy name); the policy too if it changed.
        A failure is left to the event stream to notice."""
        if not self.state.live:
            return
        with contextlib.suppress(Unreachable, ApiError):
            before = self.state.status
            status = await self.source.status()
            self.state.set_status(status)
            if before is None or (before.policy, before.mode) != (status.policy, status.mode):
                self.state.policy = await self.source.policy()
            # failed requests publish no event: read them on every refresh (every poll_s)
            self.state.requests = await self.source.requests()
            self.changed()

    def refresh_soon(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self.refresh())

    async def refilter(self) -> None:
        """Read the decisions again under the current filter (the API filters the whole log)."""
        with contextlib.suppress(Unreachable, ApiError):
            self.state.replace_decisions(await self.source.decisions(
                DECISIONS_LIMIT, self.state.knob_filter, self.state.outcome_filter))
            self.changed()
