"""`s`: switch the running policy. Pick a preset (or the policy running now), or type a policy name the
daemon knows or the path of a YAML file here (its text is sent). The daemon loads and checks it; an
invalid one is shown with its error and the running policy stays."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from optd.policies.loader import preset_names
from optd.tui.client import ApiError, Unreachable
from optd.tui.source import DataSource


class PolicyScreen(ModalScreen[dict[str, Any] | None]):
    DEFAULT_CSS = """
    PolicyScreen { align: center middle; }
    PolicyScreen > Vertical { width: 72; max-width: 100%; height: auto; max-height: 100%;
                              border: thick $accent; background: $surface; padding: 0 1; }
    PolicyScreen OptionList { height: auto; max-height: 10; }
    PolicyScreen #error { color: $error; height: auto; }
    """
    BINDINGS: ClassVar = [("escape", "cancel", "Cancel")]

    def __init__(self, source: DataSource, running: str | None, configured: str | None = None) -> None:
        super().__init__()
        self.source, self.running, self.configured = source, running, configured

    def compose(self) -> ComposeResult:
        names = preset_names()
        # the policies the daemon has loaded besides the presets: the running one, the configured one
        for name in (self.configured, self.running):
            if name and name not in names:
                names.insert(0, name)
        options = [Option(f"{n}  (running)" if n == self.running else n, id=n) for n in names]
        with Vertical():
            yield Label(f"[b]Switch policy[/b]  running: {self.running or 'none'}")
            yield OptionList(*options, id="presets")
            yield Input(placeholder="or a policy name, or the path of a YAML file", id="other")
            yield Static("", id="error")

    @property
    def error(self) -> str:
        return str(self.query_one("#error", Static).content)

    @on(OptionList.OptionSelected)
    def _preset(self, event: OptionList.OptionSelected) -> None:
        self._switch(event.option.id, None)

    @on(Input.Submitted)
    def _other(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            self.query_one("#error", Static).update("type a policy name or a file path")
            return
        self._switch(None, text)

    @work(exclusive=True, group="policy")
    async def _switch(self, name: str | None, typed: str | None) -> None:
        err = self.query_one("#error", Static)
        err.update("switching…")
        try:
            if typed is not None:
                path = Path(typed).expanduser()
                if await asyncio.to_thread(path.is_file):
                    answer = await self.source.set_policy(yaml_text=await asyncio.to_thread(path.read_text))
                else:
                    answer = await self.source.set_policy(name=typed)
            else:
                answer = await self.source.set_policy(name=name)
        except ApiError as e:
            err.update(Text(f"the daemon refused ({e.status}): {e.message}"))
            return
        except (Unreachable, OSError, UnicodeDecodeError) as e:
            err.update(Text(str(e)))
            return
        self.dismiss(answer)

    def action_cancel(self) -> None:
        self.dismiss(None)
