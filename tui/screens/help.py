"""`?`: what the keys do and how to read the screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]optd top[/b] — watch the control loop and override it

[b]p[/b]  pause / resume automation (the policy decides but applies nothing while paused)
[b]e[/b]  pin the knob under the cursor: value, optional TTL and reason, then confirm
[b]u[/b]  unpin the knob under the cursor (it goes back to its configured value)
[b]s[/b]  switch policy: a preset, a policy name the daemon knows, or a YAML file
[b]/[/b]  filter decisions: words naming a knob and/or an outcome (empty: all)
[b]w[/b]  chart window: 1m, 5m, 15m
[b]↑↓[/b] move in the knobs table or the decision log; [b]tab[/b] switches between them
[b]enter[/b] on a decision opens its reason, source and inputs
[b]?[/b]  this help      [b]q[/b]  quit

Charts: the sparkline spans the window; numbers are the latest sample. A red number is past its
limit (SLO for latency, guardrail for quality). "—" means no data (e.g. no requests finished).
Outcomes: applied, rejected (the engine refused), rolled_back (undone after a fault or a guardrail),
paused, observe (policy in observe mode), pinned (an operator's pin held it), held (damping).
Press any key to close."""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 100; max-width: 100%; height: auto; max-height: 100%;
                                  border: thick $accent; background: $surface; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP)

    def on_key(self) -> None:
        self.dismiss(None)

    def on_click(self) -> None:
        self.dismiss(None)
