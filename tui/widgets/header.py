"""The top line: which daemon, model and device, the policy and its mode, paused or automatic, and the
connection; below it, only while the daemon is unreachable, a banner saying so."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from optd.tui import fmt
from optd.tui.state import DashboardState


class HeaderBar(Static):
    DEFAULT_CSS = """
    HeaderBar { height: 1; background: $panel; color: $text; }
    """

    def show(self, state: DashboardState, now: float) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" optd ", style="bold reverse")
        t.append(f" {state.status.node if state.status and state.status.node else state.label}")
        info = state.info
        if info is not None:
            t.append(f" │ {info.model or '?'} on {info.device or '?'}")
        status = state.status
        policy = (state.policy.name if state.policy and state.policy.name else None) or (
            status.policy if status else None)
        mode = (status.mode if status else None) or (state.policy.mode if state.policy else None)
        t.append(" │ policy ")
        t.append(policy or "none", style="bold")
        if mode:
            t.append(f" ({mode})", style="yellow" if mode == "observe" else "")
        t.append(" │ ")
        if status is not None and status.paused:
            t.append(" PAUSED ", style="bold black on yellow")
        elif status is not None:
            t.append("auto", style="green")
        t.append(" │ ")
        if state.connection == "live":
            t.append("● live", style="bold green")
        elif state.connection == "connecting":
            t.append("… connecting", style="yellow")
        else:
            t.append("✕ DISCONNECTED", style="bold white on red")
        self.update(t)


class Banner(Static):
    """Shown only while the daemon is unreachable: why, and when the next try is."""

    DEFAULT_CSS = """
    Banner { height: auto; max-height: 2; background: $error; color: $text; display: none; }
    """

    def show(self, state: DashboardState, now: float) -> None:
        self.display = state.connection == "disconnected"
        if not self.display:
            return
        retry = "" if state.retry_at is None else f"; retrying in {fmt.age(state.retry_at - now)}"
        self.update(Text(f" daemon unreachable: {state.problem}{retry}. The data below is the last received.",
                         overflow="ellipsis"))
