"""The dashboard app. It takes its data source as a parameter: `optd top` gives it a DaemonClient; the
snapshot tests give it recorded answers, so that a screenshot does not depend on a live daemon.

Everything slow is awaited on the app's event loop (httpx is async) or runs in a worker: the screen
redraws every second from the DashboardState whatever the daemon does.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any, ClassVar

from rich.console import Console
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Footer, Static

from optd.tui import fmt
from optd.tui.client import ApiError, Unreachable
from optd.tui.feed import Feed
from optd.tui.screens.filter import FilterScreen
from optd.tui.screens.help import HelpScreen
from optd.tui.screens.pin import PinScreen
from optd.tui.screens.policy import PolicyScreen
from optd.tui.source import DataSource
from optd.tui.state import DashboardState
from optd.tui.widgets.charts import ChartPanel
from optd.tui.widgets.decisions import DecisionLog
from optd.tui.widgets.header import Banner, HeaderBar
from optd.tui.widgets.knobs import KnobsTable
from optd.tui.widgets.requests import RequestsPanel


class DashboardApp(App[None]):
    TITLE = "optd top"
    ENABLE_COMMAND_PALETTE = False
    # Below 120 columns one column (knobs, requests, charts, decisions); from 120 two side by side,
    # with taller charts.
    HORIZONTAL_BREAKPOINTS: ClassVar = [(0, "-narrow"), (120, "-wide")]
    CSS = """
    #body { height: 1fr; }
    .section { height: 1; color: $text-muted; background: $boost; }
    #decisions-box { height: 1fr; }
    /* one column: knobs, requests, the decision log taking what is left, charts at the bottom */
    Screen.-narrow #body { layout: vertical; }
    Screen.-narrow #left { height: 1fr; }
    Screen.-narrow #right { height: auto; }
    /* two columns: knobs, requests and the log on the left, taller charts on the right */
    Screen.-wide #body { layout: horizontal; }
    Screen.-wide #left, Screen.-wide #right { height: 1fr; }
    Screen.-wide #left { width: 1fr; }
    Screen.-wide #right { width: 1fr; border-left: solid $panel; }
    Screen.-wide ChartRow { height: 4; margin-bottom: 1; }
    Screen.-wide ChartRow > Sparkline { height: 4; }
    Screen.-wide ChartRow > .values { width: 24; }
    """
    BINDINGS: ClassVar = [
        Binding("p", "pause", "pause/resume"),
        Binding("e", "pin", "pin"),
        Binding("u", "unpin", "unpin"),
        Binding("s", "policy", "policy"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("w", "window", "window"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, source: DataSource, *, clock: Callable[[], float] = time.time,
                 tick_s: float = 1.0, poll_s: float = 3.0) -> None:
        super().__init__()
        self.source, self.clock, self.tick_s, self.poll_s = source, clock, tick_s, poll_s
        self.state = DashboardState(label=source.label)
        self.feed = Feed(source, self.state, self.redraw, clock=clock)

    def compose(self) -> ComposeResult:
        yield HeaderBar()
        yield Banner()
        with Vertical(id="body"):
            with Vertical(id="left"):
                yield KnobsTable()
                yield RequestsPanel()
                with Vertical(id="decisions-box"):
                    yield Static("", id="decisions-title", classes="section")
                    yield DecisionLog()
            with Vertical(id="right"):
                yield Static("", id="charts-title", classes="section")
                yield ChartPanel()
        yield Footer()

    def on_mount(self) -> None:
        # Kept: a query from the app looks at the screen on top, which may be a modal.
        self.header, self.banner = self.query_one(HeaderBar), self.query_one(Banner)
        self.knobs_table, self.requests_panel = self.query_one(KnobsTable), self.query_one(RequestsPanel)
        self.log_view, self.charts = self.query_one(DecisionLog), self.query_one(ChartPanel)
        self.titles = self.query_one("#decisions-title", Static), self.query_one("#charts-title", Static)
        self.redraw()
        self.run_worker(self.feed.run(), name="feed", group="feed", exclusive=True)
        self.set_interval(self.tick_s, self.redraw)
        self.set_interval(self.poll_s, self.feed.refresh_soon)
        self.query_one(KnobsTable).focus()

    def redraw(self) -> None:
        if not hasattr(self, "charts") or not self.charts.is_attached:
            return                       # not mounted yet, or shutting down
        now, state = self.clock(), self.state
        panels = (self.header, self.banner, self.knobs_table, self.requests_panel, self.log_view, self.charts)
        for panel in panels:
            panel.show(state, now)
        self.titles[0].update(f" {self.log_view.filter_text(state)} · newest first · enter opens one")
        self.titles[1].update(f" charts · last {fmt.age(state.window_s)} (w changes)")

    # -- actions --

    def _fail(self, e: Exception) -> None:
        message = f"the daemon refused: {e.message}" if isinstance(e, ApiError) else str(e)
        self.notify(message, severity="error", timeout=8)

    @work(group="write")
    async def action_pause(self) -> None:
        status = self.state.status
        pause = not (status is not None and status.paused)
        try:
            answer = await self.source.set_paused(pause)
        except (ApiError, Unreachable) as e:
            self._fail(e)
            return
        self.state.set_paused(bool(answer.get("paused", pause)))
        self.notify("automation paused: the policy applies nothing" if pause else "automation resumed")
        self.redraw()

    def action_pin(self) -> None:
        knob = self.knobs_table.selected
        bounds = self.state.policy.bounds if self.state.policy else {}
        self.push_screen(PinScreen(self.source, knob, dict(self.state.knobs), bounds, self.state.ranges),
                         self._pinned)

    def _pinned(self, answer: dict[str, Any] | None) -> None:
        if answer:
            self.notify(f"{answer.get('knob')} pinned at {fmt.knob(answer.get('value'))}")
            self.feed.refresh_soon()

    @work(group="write")
    async def action_unpin(self) -> None:
        pins = self.state.status.pins if self.state.status else {}
        knob = self.knobs_table.selected
        if knob not in pins:
            if len(pins) != 1:
                self.notify(f"{knob} is not pinned" + ("; move the cursor to a pinned knob" if pins else ""),
                            severity="warning")
                return
            knob = next(iter(pins))
        try:
            answer = await self.source.unpin(knob)
        except (ApiError, Unreachable) as e:
            self._fail(e)
            return
        self.notify(f"{knob} unpinned, now {fmt.knob(answer.get('value'))}")
        await self.feed.refresh()

    def action_policy(self) -> None:
        running = self.state.status.policy if self.state.status else None
        configured = self.state.policy.configured if self.state.policy else None
        self.push_screen(PolicyScreen(self.source, running, configured), self._switched)

    def _switched(self, answer: dict[str, Any] | None) -> None:
        if answer:
            self.notify(f"policy {answer.get('name') or ''} running".replace("  ", " "))
            self.feed.refresh_soon()

    def action_filter(self) -> None:
        self.push_screen(FilterScreen(self.state.knob_filter, self.state.outcome_filter), self._filtered)

    def _filtered(self, choice: tuple[str | None, str | None] | None) -> None:
        if choice is None:
            return
        self.state.knob_filter, self.state.outcome_filter = choice
        self.redraw()
        self.run_worker(self.feed.refilter(), group="filter", exclusive=True)

    def action_window(self) -> None:
        self.state.next_window()
        self.redraw()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    # -- text screenshots (tests, README) --

    def export_text(self) -> str:
        """The screen as plain text, as a terminal would show it."""
        console = Console(width=self.size.width, height=self.size.height, file=io.StringIO(), record=True,
                          force_terminal=True, color_system=None, legacy_windows=False, safe_box=False)
        console.print(self.screen._compositor.render_update(full=True, screen_stack=self._background_screens))
        return console.export_text()
