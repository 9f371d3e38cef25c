"""The fleet view's widgets; each draws itself from a FleetState (`show(state, now)`).

- FleetHeader: the connection, how many nodes are online (offline, paused), the broker and prefix.
- FleetBanner: only while the broker is unreachable: why, and when the next try is.
- NodeTable: one row per node: online state, model, policy and mode (PAUSED), the four knobs (a pinned
  one in yellow), tokens/s, TTFT and ITL p95, quality top-1 and KL, when it was last heard from.
- CommandLog: the latest fleet commands and each node's answer.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable, Static
from textual.widgets.data_table import RowDoesNotExist

from optd.tui import fmt
from optd.tui.fleet.state import FleetState, NodeView, SentCommand
from optd.tui.models import KNOB_NAMES

COLUMNS = (("node", "node"), ("state", "state"), ("model", "model"), ("policy", "policy"),
           ("k", "spec_length"), ("kv", "kv_compression"), ("bits", "weight_bits"),
           ("batch", "max_batch_size"), ("tok/s", "tokens_per_s"), ("TTFT p95", "ttft_p95"),
           ("ITL p95", "itl_p95"), ("top-1", "quality_top1"), ("KL", "quality_kl"), ("seen", "seen"))
SHOWN_COMMANDS = 3
MAX_REASON = 60            # of a refusal, on the command's one line


class FleetHeader(Static):
    DEFAULT_CSS = """
    FleetHeader { height: 1; background: $panel; color: $text; }
    """

    def show(self, state: FleetState, now: float) -> None:
        nodes = state.sorted_nodes()
        online = sum(n.online for n in nodes)
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" optd fleet ", style="bold reverse")
        t.append(" ")
        # the connection first: on a narrow screen the end of the line is what gets cut
        if state.connection == "live":
            t.append("● live", style="bold green")
        elif state.connection == "connecting":
            t.append("… connecting", style="yellow")
        else:
            t.append("✕ BROKER UNREACHABLE", style="bold white on red")
        t.append(f" │ {len(nodes)} node{'s' if len(nodes) != 1 else ''}: ")
        t.append(f"{online} online", style="green" if online else "")
        if offline := sum(n.status == "offline" for n in nodes):
            t.append(f", {offline} offline", style="bold red")
        paused = sum(bool(n.knobs and n.knobs.paused) for n in nodes)
        if paused:
            t.append(f", {paused} paused", style="bold yellow")
        t.append(f" │ {state.broker} {state.prefix}")
        self.update(t)


class FleetBanner(Static):
    DEFAULT_CSS = """
    FleetBanner { height: auto; max-height: 2; background: $error; color: $text; display: none; }
    """

    def show(self, state: FleetState, now: float) -> None:
        self.display = state.connection == "disconnected"
        if not self.display:
            return
        retry = "" if state.retry_at is None else f"; retrying in {fmt.age(state.retry_at - now)}"
        self.update(Text(f" broker unreachable: {state.problem}{retry}. The table is what was last heard.",
                         overflow="ellipsis"))


def _policy(node: NodeView) -> Text:
    k = node.knobs
    t = Text(no_wrap=True)
    t.append((k.policy if k else None) or "none")
    if k is not None and k.mode == "observe":
        t.append(" observe", style="yellow")
    if k is not None and k.paused:
        t.append(" PAUSED", style="bold black on yellow")
    return t


def row(node: NodeView, now: float) -> list[Text | str]:
    """The cells of `node`'s row, in COLUMNS order."""
    if node.status is None:
        state = Text("?", style="dim")
    else:
        state = Text(node.status, style="bold green" if node.online else "bold white on red")
    pins = node.knobs.pins if node.knobs else {}
    knobs = [Text(fmt.knob(node.knob(name)), style="bold yellow" if name in pins else "")
             for name in KNOB_NAMES]
    m = node.metric
    top1 = m("quality_top1")
    seen = fmt.age(now - node.seen_at) if node.seen_at is not None else fmt.DASH
    return [node.name, state, (node.knobs.model if node.knobs else None) or "?", _policy(node), *knobs,
            fmt.number(m("tokens_per_s")), fmt.seconds(m("ttft_p95")), fmt.seconds(m("itl_p95")),
            fmt.DASH if top1 is None else f"{top1:.3f}", fmt.number(m("quality_kl"), 3), seen]


class NodeTable(DataTable):
    DEFAULT_CSS = """
    NodeTable { height: 1fr; }
    """
    BINDINGS: ClassVar = [Binding("enter", "select_cursor", "open")]      # shown in the footer

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.fixed_columns = 1                  # the node's name stays when the table scrolls sideways
        for label, key in COLUMNS:
            self.add_column(label, key=key)

    @property
    def selected(self) -> str | None:
        """The node under the cursor."""
        if self.row_count == 0:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        return str(key.value)

    def select(self, node: str) -> None:
        with contextlib.suppress(RowDoesNotExist):      # gone from the fleet
            self.move_cursor(row=self.get_row_index(node))

    def show(self, state: FleetState, now: float) -> None:
        nodes = state.sorted_nodes()
        names = [n.name for n in nodes]
        if names != [str(k.value) for k in self.rows]:
            keep = self.selected
            self.clear()
            for node in nodes:
                self.add_row(*row(node, now), key=node.name)
            if keep is not None:
                self.select(keep)
            return
        for node in nodes:
            for (_, column), cell in zip(COLUMNS, row(node, now), strict=True):
                self.update_cell(node.name, column, cell, update_width=True)


def describe(sent: SentCommand, now: float) -> Text:
    """One line: when, what, then the answers: refusals first (with their reasons), then the nodes that
    did not answer, then the ones that took it."""
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"{fmt.clock(sent.sent_at)} ", style="dim")
    t.append(sent.command.describe(), style="bold")
    t.append(" → ")
    if not sent.expected and not sent.results:
        t.append("no node online", style="yellow")
        return t
    ok = [name for name, r in sent.results.items() if r.outcome == "ok"]
    parts = []
    for name, r in sent.results.items():
        if r.outcome != "ok":
            reason = r.reason or fmt.DASH
            reason = reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 1] + "…"
            parts.append(Text(f"{name} {r.outcome}: {reason}", style="bold red"))
    if pending := sent.pending():
        waiting = sent.waiting(now)
        parts.append(Text(f"{'waiting: ' if waiting else 'no answer: '}{', '.join(pending)}",
                          style="yellow" if waiting else "bold yellow"))
    if ok:
        parts.append(Text(f"ok: {', '.join(sorted(ok))}", style="bold green"))
    t.append_text(Text(" · ").join(parts))
    return t


class CommandLog(Static):
    DEFAULT_CSS = """
    CommandLog { height: auto; max-height: 3; padding: 0 1; }
    """

    def show(self, state: FleetState, now: float) -> None:
        shown = state.commands[:SHOWN_COMMANDS]
        if not shown:
            self.update(Text("no fleet commands sent yet: p pauses, r resumes, s switches the policy "
                             "of every node", style="dim", no_wrap=True, overflow="ellipsis"))
            return
        lines = Text(no_wrap=True, overflow="ellipsis")         # one line per command, never wrapped
        for i, sent in enumerate(shown):
            lines.append_text(Text("\n") if i else Text())
            lines.append_text(describe(sent, now))
        self.update(lines)
