"""The fleet view: every node under the prefix in a table, fleet commands with a confirmation, a node
drilled into.

The app reads a FleetState that a FleetLink fills (started here if nobody started it); the screen redraws
every second from the state whatever the broker does. Drilling into a node whose HTTP URL is known exits
the app with a `Drill`: `optd top --mqtt` (optd.tui.fleet.main) then runs the single-node dashboard on
that URL and comes back here when it quits. Otherwise the node's detail view from MQTT opens.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from rich.console import Console
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static

from optd.tui.fleet.commands import FleetCommand
from optd.tui.fleet.confirm import ConfirmScreen
from optd.tui.fleet.detail import NodeDetailScreen
from optd.tui.fleet.help import FleetHelpScreen
from optd.tui.fleet.link import FleetLink, NotConnected
from optd.tui.fleet.policy import FleetPolicyScreen
from optd.tui.fleet.widgets import CommandLog, FleetBanner, FleetHeader, NodeTable


@dataclass(frozen=True)
class Drill:
    """The operator opened `node`: show its own dashboard at `url`."""

    node: str
    url: str


class FleetApp(App[Drill | None]):
    TITLE = "optd top · fleet"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    .section { height: 1; color: $text-muted; background: $boost; }
    """
    BINDINGS: ClassVar = [
        Binding("enter", "open", "open"),
        Binding("d", "details", "details"),
        Binding("p", "pause_all", "pause all"),
        Binding("r", "resume_all", "resume all"),
        Binding("s", "policy_all", "policy all"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, link: FleetLink, *, clock: Callable[[], float] = time.time, tick_s: float = 1.0,
                 select: str | None = None) -> None:
        super().__init__()
        self.link, self.state, self.clock, self.tick_s = link, link.state, clock, tick_s
        self.initial = select

    def compose(self) -> ComposeResult:
        yield FleetHeader()
        yield FleetBanner()
        yield NodeTable()
        yield Static(" fleet commands · <prefix>/all/cmd/set · each node's answer", classes="section",
                     id="commands-title")
        yield CommandLog()
        yield Footer()

    def on_mount(self) -> None:
        # Kept: a query from the app looks at the screen on top, which may be a modal.
        self.header, self.banner = self.query_one(FleetHeader), self.query_one(FleetBanner)
        self.table, self.command_log = self.query_one(NodeTable), self.query_one(CommandLog)
        self.link.start()
        self.redraw()
        if self.initial is not None:
            self.table.select(self.initial)
        self.set_interval(self.tick_s, self.redraw)
        self.table.focus()

    def redraw(self) -> None:
        if not hasattr(self, "command_log") or not self.command_log.is_attached:
            return                       # not mounted yet, or shutting down
        now = self.clock()
        for panel in (self.header, self.banner, self.table, self.command_log):
            panel.show(self.state, now)

    # -- a node --

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        name = self.table.selected
        if name is None:
            return
        node = self.state.nodes.get(name)
        if node is not None and node.url:
            self.exit(Drill(name, node.url))
        else:
            self.action_details()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # on a node's detail view, `d` again would stack a second one
        return not (action == "details" and isinstance(self.screen, NodeDetailScreen))

    def action_details(self) -> None:
        if isinstance(self.screen, NodeDetailScreen):
            return
        if (name := self.table.selected) is not None:
            self.push_screen(NodeDetailScreen(self.state, name, self.clock, self.tick_s),
                             lambda url, n=name: self._opened(n, url))

    def _opened(self, name: str, url: str | None) -> None:
        if url:
            self.exit(Drill(name, url))

    # -- fleet commands --

    def _confirm(self, command: FleetCommand, what: str) -> None:
        online = [n.name for n in self.state.sorted_nodes() if n.online]
        signed = ("signed with the HMAC secret" if self.link.hmac_secret else
                  "unsigned (nodes with mqtt.hmac_secret set will refuse it: give --hmac-secret)")
        names = ", ".join(online[:6]) + (", …" if len(online) > 6 else "")
        question = (f"{what} on every node under {self.state.prefix}: {len(online)} online now"
                    f"{f' ({names})' if online else ''}.\nPublished to {self.link.fleet_topic}, {signed}.")

        def answered(yes: bool | None) -> None:
            if yes:
                self._send(command)
        self.push_screen(ConfirmScreen(f"Fleet: {command.describe()}", question), answered)

    def action_pause_all(self) -> None:
        self._confirm(FleetCommand(action="pause"), "Pause automation (policies decide, apply nothing)")

    def action_resume_all(self) -> None:
        self._confirm(FleetCommand(action="resume"), "Resume automation")

    def action_policy_all(self) -> None:
        running = Counter(n.knobs.policy for n in self.state.nodes.values() if n.knobs and n.knobs.policy)

        def picked(name: str | None) -> None:
            if name:
                self._confirm(FleetCommand(action="set_policy", name=name), f"Switch the policy to {name}")
        self.push_screen(FleetPolicyScreen(dict(running)), picked)

    @work(group="send")
    async def _send(self, command: FleetCommand) -> None:
        try:
            sent = await self.link.send(command)
        except NotConnected as e:
            self.notify(str(e), severity="error", timeout=8)
            return
        self.notify(f"{command.describe()} sent to {len(sent.expected)} online node"
                    f"{'s' if len(sent.expected) != 1 else ''}; their answers show below the table")
        self.redraw()

    def action_help(self) -> None:
        self.push_screen(FleetHelpScreen())

    # -- text screenshots (tests, README) --

    def export_text(self) -> str:
        """The screen as plain text, as a terminal would show it."""
        console = Console(width=self.size.width, height=self.size.height, file=io.StringIO(), record=True,
                          force_terminal=True, color_system=None, legacy_windows=False, safe_box=False)
        console.print(self.screen._compositor.render_update(full=True, screen_stack=self._background_screens))
        return console.export_text()
