"""One node as its MQTT messages tell it: the retained `knobs` (values, pins, policy, pause, URL), the
latest telemetry sample and the decisions heard since the view connected. `enter` opens the node's own
dashboard when its URL is known; escape goes back to the fleet."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from optd.tui import fmt
from optd.tui.fleet.state import FleetState, NodeView
from optd.tui.models import KNOB_NAMES


def _num(digits: int) -> Callable[[float | None], str]:
    return lambda v: fmt.number(v, digits)


# the telemetry lines: (label, metric, format) each
TELEMETRY = (
    (("tokens/s", "tokens_per_s", _num(1)), ("goodput", "goodput_tokens_per_s", _num(1)),
     ("req/s", "requests_per_s", _num(2)), ("running", "requests_running", _num(0)),
     ("waiting", "requests_waiting", _num(0))),
    (("TTFT p95", "ttft_p95", fmt.seconds), ("ITL p95", "itl_p95", fmt.seconds),
     ("e2e p95", "e2e_p95", fmt.seconds), ("preempt/s", "preemptions_per_s", _num(2))),
    (("KV use", "kv_usage", fmt.ratio), ("accept", "acceptance_rate", fmt.ratio),
     ("accept len", "acceptance_length", _num(2))),
    (("top-1", "quality_top1", _num(3)), ("KL", "quality_kl", _num(3)), ("GPU util", "gpu_util", fmt.ratio),
     ("GPU mem", "gpu_memory_used_ratio", fmt.ratio), ("power W", "gpu_power_w", _num(0))),
)


def render_node(node: NodeView, now: float) -> Group:
    k = node.knobs
    head = Text(no_wrap=True, overflow="ellipsis")
    head.append(f" {node.name} ", style="bold reverse")
    head.append(f" {node.status or '?'}", style="bold green" if node.online else "bold red")
    head.append(f" │ {(k.model if k else None) or '?'} │ policy ")
    head.append((k.policy if k else None) or "none", style="bold")
    if k is not None and k.mode:
        head.append(f" ({k.mode})")
    head.append(" │ ")
    head.append("PAUSED" if k and k.paused else "auto", style="bold yellow" if k and k.paused else "green")
    url = Text(f" HTTP API: {node.url} (enter opens its dashboard)" if node.url else
               " HTTP API: not announced (a daemon older than the fleet view): this view is all there is",
               style="dim", overflow="ellipsis")

    knobs = Table(box=None, padding=(0, 2, 0, 1), show_edge=False)
    for column in ("knob", "value", "pin"):
        knobs.add_column(column, style="bold" if column == "knob" else "")
    pins = k.pins if k else {}
    for name in KNOB_NAMES:
        pin = pins.get(name)
        if pin is None:
            pin_text = Text(fmt.DASH, style="dim")
        else:
            left = "no ttl" if pin.expires_at is None else f"for {fmt.age(pin.expires_at - now)}"
            pin_text = Text(f"{fmt.knob(pin.value)} {left} {pin.reason or ''}".rstrip(), style="yellow")
        knobs.add_row(name, fmt.knob(node.knob(name)), pin_text)

    ts = node.metric("ts")
    when = f"{fmt.clock(ts)}, {fmt.age(now - ts)} ago" if ts else "none received yet"
    lines = [Text(f" telemetry ({when})", style="bold")]
    for group in TELEMETRY:
        line = Text(" ", no_wrap=True, overflow="ellipsis")
        for label, metric, show in group:
            value = node.metric(metric)
            line.append(f"{label} ", style="dim")
            line.append(f"{show(value)}  ")
        lines.append(line)

    decisions = [Text(" decisions heard since connecting, newest first", style="bold")]
    for d in list(node.decisions)[:12]:
        line = Text(" ", no_wrap=True, overflow="ellipsis")
        line.append(f"{fmt.clock(d.ts)} ", style="dim")
        line.append(f"{d.knob:<15} {fmt.knob(d.old_value)}→{fmt.knob(d.new_value)} ")
        line.append(f"{d.outcome:<11} ", style="green" if d.outcome == "applied" else "yellow")
        line.append(d.reason or "")
        decisions.append(line)
    if len(decisions) == 1:
        decisions.append(Text(" none yet", style="dim"))
    return Group(head, url, Text(""), knobs, Text(""), *lines, Text(""), *decisions)


class NodeDetailScreen(Screen[str | None]):
    """Dismisses with the node's URL when the operator asks to open its dashboard, else None."""

    DEFAULT_CSS = """
    NodeDetailScreen #detail { height: auto; }
    """
    BINDINGS: ClassVar = [
        Binding("escape", "back", "back"),
        Binding("enter", "open", "open dashboard"),
        Binding("q", "back", "back", show=False),
    ]

    def __init__(self, state: FleetState, node: str, clock: Callable[[], float], tick_s: float = 1.0) -> None:
        super().__init__()
        self.state, self.node, self.clock, self.tick_s = state, node, clock, tick_s

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("", id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.redraw()
        self.set_interval(self.tick_s, self.redraw)

    def redraw(self) -> None:
        node = self.state.nodes.get(self.node)
        body = render_node(node, self.clock()) if node is not None else Text(
            f" {self.node} is gone: its retained state was cleared", style="bold red")
        self.query_one("#detail", Static).update(body)

    def action_back(self) -> None:
        self.dismiss(None)

    def action_open(self) -> None:
        node = self.state.nodes.get(self.node)
        if node is None or not node.url:
            self.notify(f"{self.node} has not announced its HTTP API", severity="warning")
            return
        self.dismiss(node.url)
