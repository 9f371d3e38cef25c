"""Requests: running, waiting, throughput of requests, preemptions, end-to-end p95, and the control
events the dashboard could not keep up with; below, the latest requests that failed (errors, rejections,
aborts: GET /v1/control/requests), while they are recent."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from optd.tui import fmt
from optd.tui.state import DashboardState

RECENT_ERROR_S = 600.0          # a failed request is news for this long; the counts stay
MAX_ERROR_LINES = 3


class RequestsPanel(Static):
    DEFAULT_CSS = """
    RequestsPanel { height: auto; max-height: 4; padding: 0 1; }
    """

    def show(self, state: DashboardState, now: float) -> None:
        engine = state.status.engine if state.status else None
        running = state.latest("requests_running")
        waiting = state.latest("requests_waiting")
        if running is None and state.requests is not None:
            running, waiting = state.requests.running, state.requests.waiting
        if running is None and engine is not None:
            running, waiting = engine.running, engine.waiting
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append("requests ", style="bold")
        t.append(f"running {fmt.number(running, 0)}  ")
        t.append(f"waiting {fmt.number(waiting, 0)}  ", style="bold yellow" if (waiting or 0) > 0 else "")
        t.append(f"{fmt.number(state.latest('requests_per_s'), 2)} req/s  ")
        preempt = state.latest("preemptions_per_s")
        t.append(f"preempt {fmt.number(preempt, 2)}/s  ", style="bold red" if (preempt or 0) > 0 else "")
        t.append(f"e2e p95 {fmt.seconds(state.latest('e2e_p95'))}")
        if engine is not None and not engine.alive:
            t.append("  ENGINE STOPPED", style="bold white on red")
        if state.events_dropped:
            t.append(f"  ({state.events_dropped} events dropped)", style="dim")
        counts = state.requests.error_counts if state.requests else {}
        if failed := {k: n for k, n in counts.items() if n}:
            t.append("  failed " + " ".join(f"{k} {n}" for k, n in failed.items()), style="bold red")
        recent = [e for e in (state.requests.recent_errors if state.requests else [])
                  if now - e.ts <= RECENT_ERROR_S][:MAX_ERROR_LINES]
        for e in recent:
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"\n✕ {fmt.clock(e.ts)} ", style="red")
            line.append(f"{e.status} ", style="bold red")
            line.append(f"{e.endpoint or '?'}: {e.error or fmt.DASH}")
            t.append_text(line)
        self.update(t)
