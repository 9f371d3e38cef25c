"""Requests: running, waiting, throughput of requests, preemptions, end-to-end p95, and the control
events the dashboard could not keep up with."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from optd.tui import fmt
from optd.tui.state import DashboardState


class RequestsPanel(Static):
    DEFAULT_CSS = """
    RequestsPanel { height: 1; padding: 0 1; }
    """

    def show(self, state: DashboardState, now: float) -> None:
        engine = state.status.engine if state.status else None
        running = state.latest("requests_running")
        waiting = state.latest("requests_waiting")
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
        self.update(t)
