"""`s` in the fleet view: pick the policy every node switches to. Over MQTT a node takes a policy by name
only (a preset or a name in its policy search path; optd.daemon.mqtt_commands), so this offers the
presets, the policies the fleet runs now, and a name typed in."""

from __future__ import annotations

import re
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from optd.policies.loader import preset_names

# The names a daemon takes over its API and MQTT (optd.daemon.policy_job.NAME_RE)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def check_name(text: str) -> str:
    """A policy name a node can load over MQTT; ValueError says what is wrong (the node checks again)."""
    name = text.strip()
    if not name:
        raise ValueError("policy: enter a name")
    if not NAME.fullmatch(name):
        raise ValueError(f"policy: {name[:40]!r} is not a policy name (letters, digits, '-', '_'; "
                         "over MQTT a node loads presets and names in its search path, never files)")
    return name


class FleetPolicyScreen(ModalScreen[str | None]):
    """Dismisses with the chosen policy name, or None."""

    DEFAULT_CSS = """
    FleetPolicyScreen { align: center middle; }
    FleetPolicyScreen > Vertical { width: 72; max-width: 100%; height: auto; max-height: 100%;
                                   border: thick $accent; background: $surface; padding: 0 1; }
    FleetPolicyScreen OptionList { height: auto; max-height: 10; }
    FleetPolicyScreen #error { color: $error; height: auto; }
    """
    BINDINGS: ClassVar = [("escape", "cancel", "Cancel")]

    def __init__(self, running: dict[str, int]) -> None:
        super().__init__()
        self.running = running               # policy name -> how many nodes run it

    def compose(self) -> ComposeResult:
        names = preset_names()
        names[:0] = [n for n in sorted(self.running) if n not in names]
        options = []
        for name in names:
            count = self.running.get(name, 0)
            label = f"{name}  (running on {count} node{'s' if count != 1 else ''})" if count else name
            options.append(Option(label, id=name))
        with Vertical():
            yield Label("[b]Switch every node's policy[/b]")
            yield OptionList(*options, id="presets")
            yield Input(placeholder="or a policy name the nodes know", id="other")
            yield Static("", id="error")

    @property
    def error(self) -> str:
        return str(self.query_one("#error", Static).content)

    @on(OptionList.OptionSelected)
    def _preset(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    @on(Input.Submitted)
    def _other(self, event: Input.Submitted) -> None:
        try:
            self.dismiss(check_name(event.value))
        except ValueError as e:
            self.query_one("#error", Static).update(str(e))

    def action_cancel(self) -> None:
        self.dismiss(None)
