"""The four knobs: value now, the policy's bounds, the pin (with its TTL left), and the last change
with its reason and age. The cursor row is the knob that `e` and `u` act on."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from optd.tui import fmt
from optd.tui.models import KNOB_NAMES
from optd.tui.state import DashboardState

COLUMNS = (("knob", "knob"), ("value", "value"), ("bounds", "bounds"), ("pin", "pin"))
CHANGE = "change"          # the last column: as wide as what the others leave


class KnobsTable(DataTable):
    DEFAULT_CSS = """
    KnobsTable { height: auto; max-height: 6; overflow-x: hidden; }
    """

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = False
        for label, key in COLUMNS:
            self.add_column(label, key=key)
        self.add_column("last change", key=CHANGE, width=20)
        for name in KNOB_NAMES:
            self.add_row(name, *([""] * len(COLUMNS)), key=name)

    @property
    def selected(self) -> str:
        """The knob under the cursor."""
        return KNOB_NAMES[min(max(self.cursor_row, 0), len(KNOB_NAMES) - 1)]

    def _fit_change_column(self) -> None:
        # DataTable has no fractional widths: size the last column to what the others leave.
        others = sum(c.get_render_width(self) for key, c in self.columns.items() if key != CHANGE)
        want = max(12, self.size.width - others - 2 * self.cell_padding)
        if self.columns[CHANGE].width != want:
            self.remove_column(CHANGE)
            self.add_column("last change", key=CHANGE, width=want)

    def show(self, state: DashboardState, now: float) -> None:
        self._fit_change_column()           # first: re-adding the column empties it
        pins = state.status.pins if state.status else {}
        bounds = state.policy.bounds if state.policy else {}
        for name in KNOB_NAMES:
            value = state.knobs.get(name)
            b = bounds.get(name)
            bound = f"{b.min:g}..{b.max:g}" if b else fmt.DASH
            if state.policy is not None and name in state.policy.unsupported:
                bound = Text("n/a", style="dim")      # the engine cannot turn it
            if (pin := pins.get(name)) is not None:
                left = " no ttl" if pin.expires_at is None else f" for {fmt.age(pin.expires_at - now)}"
                pin_text = Text(f"{fmt.knob(pin.value)}{left}", style="bold yellow")
            else:
                pin_text = Text(fmt.DASH, style="dim")
            change = state.last_change(name)
            if change is None:
                change_text = Text(fmt.DASH, style="dim")
            else:
                change_text = Text(no_wrap=True, overflow="ellipsis")
                change_text.append(f"{fmt.knob(change.old_value)}→{fmt.knob(change.new_value)} ")
                change_text.append(f"{fmt.age(now - change.ts)} ago ", style="dim")
                change_text.append(change.reason or "")
            cells = {"value": Text(fmt.knob(value), style="bold"), "bounds": bound, "pin": pin_text,
                     CHANGE: change_text}
            for column, cell in cells.items():
                self.update_cell(name, column, cell, update_width=column != CHANGE)
