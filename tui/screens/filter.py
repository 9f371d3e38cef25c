"""`/`: filter the decision log. Type words that name a knob and/or an outcome ("spec rej" is
spec_length + rejected; any unambiguous prefix will do); empty clears the filter."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from optd.tui.models import KNOB_NAMES, OUTCOMES


def parse_filter(text: str) -> tuple[str | None, str | None]:
    """(knob, outcome) named by the words of `text`; ValueError names a word that fits neither or both."""
    knob = outcome = None
    for word in text.lower().replace("=", " ").split():
        if word in ("knob", "outcome"):
            continue
        knobs = [k for k in KNOB_NAMES if k.startswith(word)]
        outcomes = [o for o in OUTCOMES if o.startswith(word)]
        if word in KNOB_NAMES:
            knobs, outcomes = [word], []
        elif word in OUTCOMES:
            knobs, outcomes = [], [word]
        if len(knobs) + len(outcomes) != 1:
            choices = knobs + outcomes
            hint = f"could be {', '.join(choices)}" if choices else \
                f"knobs: {', '.join(KNOB_NAMES)}; outcomes: {', '.join(OUTCOMES)}"
            raise ValueError(f"{word!r} names no single knob or outcome ({hint})")
        if knobs:
            knob = knobs[0]
        else:
            outcome = outcomes[0]
    return knob, outcome


class FilterScreen(ModalScreen[tuple[str | None, str | None] | None]):
    DEFAULT_CSS = """
    FilterScreen { align: center bottom; }
    FilterScreen > Vertical { height: auto; background: $surface; border-top: solid $accent; padding: 0 1; }
    FilterScreen #error { color: $error; height: auto; }
    """
    BINDINGS: ClassVar = [("escape", "cancel", "Cancel")]

    def __init__(self, knob: str | None, outcome: str | None) -> None:
        super().__init__()
        self.current = " ".join(p for p in (knob, outcome) if p)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("filter decisions by knob and/or outcome (e.g. [b]spec rej[/b]); empty shows all")
            yield Input(value=self.current, placeholder="knob outcome", id="filter")
            yield Static("", id="error")

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        try:
            self.dismiss(parse_filter(event.value))
        except ValueError as e:
            self.query_one("#error", Static).update(str(e))

    def action_cancel(self) -> None:
        self.dismiss(None)
