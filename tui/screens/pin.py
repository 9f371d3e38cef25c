"""`e`: pin a knob. The value is checked against the knob's range before anything is sent, an optional
TTL and reason go with it, and a confirmation step shows exactly what will happen. The daemon checks
again against its engine's envelope; its refusal is shown here and the modal stays open."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from optd.tui import fmt
from optd.tui.client import ApiError, Unreachable
from optd.tui.limits import knob_range, parse_ttl, parse_value
from optd.tui.models import KNOB_NAMES, KnobBounds
from optd.tui.source import DataSource


class PinScreen(ModalScreen[dict[str, Any] | None]):
    """Dismisses with the daemon's answer to the pin, or None when cancelled."""

    DEFAULT_CSS = """
    PinScreen { align: center middle; }
    PinScreen > #dialog { width: 66; max-width: 100%; height: auto; border: thick $accent;
                          background: $surface; padding: 0 1; }
    PinScreen #form, PinScreen #confirm, PinScreen .field, PinScreen .buttons { height: auto; }
    PinScreen .field { margin: 1 0 0 0; }
    PinScreen .field > Label { width: 8; }
    PinScreen .field > Input, PinScreen .field > Select { width: 1fr; }
    PinScreen #range { color: $text-muted; margin: 0 0 0 8; }
    PinScreen #error { color: $error; height: auto; margin: 1 0 0 0; }
    PinScreen #confirm { display: none; margin: 1 0 0 0; }
    PinScreen.confirming #form { display: none; }
    PinScreen.confirming #confirm { display: block; }
    PinScreen .buttons { align-horizontal: right; margin: 1 0 0 0; }
    PinScreen Button { margin: 0 0 0 1; min-width: 10; }
    """
    BINDINGS: ClassVar = [("escape", "cancel", "Cancel")]

    def __init__(self, source: DataSource, knob: str, knobs: dict[str, Any],
                 bounds: dict[str, KnobBounds], ranges: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.source, self.knobs, self.bounds, self.ranges = source, knobs, bounds, ranges or {}
        self.initial = knob
        self.request: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("[b]Pin a knob[/b]  (the policy leaves it alone until unpinned)")
            with Vertical(id="form"):
                with Horizontal(classes="field"):
                    yield Label("knob")
                    yield Select([(k, k) for k in KNOB_NAMES], value=self.initial, allow_blank=False,
                                 compact=True, id="knob")
                yield Static("", id="range")
                with Horizontal(classes="field"):
                    yield Label("value")
                    yield Input(placeholder="the value to hold", compact=True, id="value")
                with Horizontal(classes="field"):
                    yield Label("TTL")
                    yield Input(placeholder="90s, 10m, 1h (empty: until unpinned)", compact=True, id="ttl")
                with Horizontal(classes="field"):
                    yield Label("reason")
                    yield Input(placeholder="optional, goes into the decision log", compact=True,
                                id="reason")
                with Horizontal(classes="buttons"):
                    yield Button("Pin…", variant="primary", compact=True, id="pin")
                    yield Button("Cancel", compact=True, id="cancel")
            with Vertical(id="confirm"):
                yield Static("", id="summary")
                with Horizontal(classes="buttons"):
                    yield Button("Confirm", variant="warning", compact=True, id="yes")
                    yield Button("Back", compact=True, id="back")
            yield Static("", id="error")

    def on_mount(self) -> None:
        self._describe(self.initial)
        self.query_one("#value", Input).focus()

    @property
    def knob(self) -> str:
        return str(self.query_one("#knob", Select).value)

    def _describe(self, knob: str) -> None:
        allowed = knob_range(knob, self.ranges.get(knob))
        b = self.bounds.get(knob)
        policy = f" · policy bounds {b.min:g}..{b.max:g}" if b else ""
        self.query_one("#range", Static).update(
            f"{knob}: {allowed.describe()} · now {fmt.knob(self.knobs.get(knob))}{policy}")

    @on(Select.Changed, "#knob")
    def _knob_changed(self, event: Select.Changed) -> None:
        self._describe(str(event.value))
        self._error("")

    def _error(self, message: str) -> None:
        self.query_one("#error", Static).update(Text(message))

    @property
    def error(self) -> str:
        return str(self.query_one("#error", Static).content)

    @on(Input.Submitted)
    @on(Button.Pressed, "#pin")
    def _check(self) -> None:
        knob = self.knob
        try:
            value = parse_value(knob, self.query_one("#value", Input).value, self.ranges.get(knob))
            ttl = parse_ttl(self.query_one("#ttl", Input).value)
        except ValueError as e:
            self._error(str(e))
            return
        reason = self.query_one("#reason", Input).value.strip()
        self.request = {"knob": knob, "value": value, "ttl_s": ttl, "reason": reason}
        until = f"for {fmt.age(ttl)}" if ttl is not None else "until unpinned"
        self.query_one("#summary", Static).update(
            f"Pin [b]{knob}[/b] from {fmt.knob(self.knobs.get(knob))} to [b]{fmt.knob(value)}[/b] {until}?\n"
            f"Reason: {reason or fmt.DASH}")
        self._error("")
        self.add_class("confirming")
        self.query_one("#yes", Button).focus()

    @on(Button.Pressed, "#back")
    def _back(self) -> None:
        self.remove_class("confirming")
        self.query_one("#value", Input).focus()

    @on(Button.Pressed, "#yes")
    def _confirm(self) -> None:
        self.query_one("#yes", Button).disabled = True
        self._error("pinning…")
        self._send()

    @work(exclusive=True, group="pin")
    async def _send(self) -> None:
        assert self.request is not None
        r = self.request
        try:
            answer = await self.source.pin(r["knob"], r["value"], r["ttl_s"], r["reason"])
        except (ApiError, Unreachable) as e:
            message = f"the daemon refused: {e.message}" if isinstance(e, ApiError) else str(e)
            self.query_one("#yes", Button).disabled = False
            self._back()
            self._error(message)
            return
        self.dismiss(answer)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
