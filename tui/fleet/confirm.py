"""A yes/no question before a fleet-wide command: what will be sent, to whom, signed or not."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class ConfirmScreen(ModalScreen[bool]):
    """Dismisses with True on Confirm (or `y`), False on Cancel (`n`, escape)."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 84; max-width: 100%; height: auto; border: thick $warning;
                               background: $surface; padding: 0 1; }
    ConfirmScreen #question { margin: 1 0 0 0; height: auto; }
    ConfirmScreen Horizontal { height: auto; align-horizontal: right; margin: 1 0 0 0; }
    ConfirmScreen Button { margin: 0 0 0 1; min-width: 10; }
    """
    BINDINGS: ClassVar = [("escape", "answer(False)", "Cancel"), ("n", "answer(False)", "No"),
                          ("y", "answer(True)", "Yes")]

    def __init__(self, title: str, question: str) -> None:
        super().__init__()
        self.title_text, self.question = title, question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"[b]{self.title_text}[/b]")
            yield Static(self.question, id="question")
            with Horizontal():
                yield Button("Confirm", variant="warning", compact=True, id="yes")
                yield Button("Cancel", compact=True, id="no")

    def on_mount(self) -> None:
        self.query_one("#yes", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
