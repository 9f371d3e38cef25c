"""The decision log, newest first, filtered by knob and outcome; Enter on a line opens it to show the
decision's reason, source, policy and inputs."""

from __future__ import annotations

import textwrap
from typing import Any

from rich.text import Text
from textual.widgets import Tree

from optd.tui import fmt
from optd.tui.models import Decision
from optd.tui.state import DashboardState

OUTCOME_STYLE = {"applied": "green", "rejected": "bold red", "rolled_back": "bold magenta",
                 "paused": "yellow", "observe": "cyan", "pinned": "yellow", "held": "dim"}


def _label(d: Decision) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"{fmt.clock(d.ts)} ", style="dim")
    t.append(f"{d.knob:<14} ")
    t.append(f"{fmt.knob(d.old_value):>5}→{fmt.knob(d.new_value):<5} ")
    t.append(f"{d.outcome:<11} ", style=OUTCOME_STYLE.get(d.outcome, ""))
    t.append(d.reason or "")
    return t


def _value(key: str, v: Any) -> str:
    if key.endswith("_at") and isinstance(v, int | float):
        return fmt.clock(v)                     # an epoch time, e.g. a pin's expires_at
    if isinstance(v, float):
        return f"{v:.4g}"
    return fmt.knob(v) if isinstance(v, int) or v is None else str(v)


class DecisionLog(Tree):
    DEFAULT_CSS = """
    DecisionLog { height: 1fr; min-height: 3; padding: 0; overflow-x: hidden; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("decisions", **kwargs)
        self.show_root = False
        self.guide_depth = 2
        self._shown: tuple = ()
        self._open: set[tuple] = set()

    def show(self, state: DashboardState, now: float) -> None:
        decisions = state.visible_decisions()
        shown = tuple(d.key for d in decisions)
        if shown == self._shown:
            return
        self._shown = shown
        self._open = {n.data for n in self.root.children if n.is_expanded}
        cursor_key = self.cursor_node.data if self.cursor_node is not None else None
        self.clear()
        if not decisions:
            what = "decisions" if state.knob_filter is None and state.outcome_filter is None else \
                "decisions match the filter"
            self.root.add_leaf(Text(f"no {what} yet", style="dim"))
            return
        width = max(30, self.size.width - 6)     # leaves are one line each: wrap long text into several
        for d in decisions:
            node = self.root.add(_label(d), data=d.key, expand=d.key in self._open)
            for line in textwrap.wrap(f"reason: {d.reason or fmt.DASH}", width, subsequent_indent="  "):
                node.add_leaf(Text(line))
            where = d.source or d.inputs.get("source") or "?"
            policy = f"  policy {d.policy} ({d.mode})" if d.policy else ""
            cost = f"  cost {fmt.seconds(d.cost_s)}" if d.cost_s is not None else ""
            node.add_leaf(Text(f"source: {where}{policy}{cost}", style="dim"))
            inputs = "  ".join(f"{k}={_value(k, v)}" for k, v in d.inputs.items() if k != "source")
            for line in textwrap.wrap(f"inputs: {inputs}" if inputs else "", width, subsequent_indent="  "):
                node.add_leaf(Text(line, style="cyan"))
        # keep the cursor on the decision it was on; else on the newest, so enter opens something
        node = next((n for n in self.root.children if n.data == cursor_key), self.root.children[0])
        self.move_cursor(node, animate=False)

    def filter_text(self, state: DashboardState) -> str:
        parts = [p for p in (state.knob_filter, state.outcome_filter) if p]
        return f"decisions ({', '.join(parts)})" if parts else "decisions"
