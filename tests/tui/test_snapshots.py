"""Screenshots of the dashboard (pytest-textual-snapshot) at 80×24 and 160×48: the main screen and the
pin modal.

The app is fed answers a real daemon gave (data/recorded.json, written by `python -m tests.tui.record
URL` against `optd serve --demo --policy balanced` with a pin set), through a source that replays them,
and a clock stopped at the time they were read. Not a live daemon and not a fake one: a screenshot must
be the same on every run, and a live daemon's numbers, timing and wall clock never are; the answers are
the daemon's own JSON, so the screen is what a user would see at that moment. The live behaviour is
tested against a real daemon in test_live.py. Update after an intended change of the screen with
`pytest tests/tui/test_snapshots.py --snapshot-update`, and look at the SVGs it writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from optd.tui.app import DashboardApp
from optd.tui.client import ApiError
from optd.tui.models import (
    Decision,
    DecisionList,
    PolicyInfo,
    RequestsInfo,
    ServerInfo,
    Status,
    parse_sample,
)
from optd.tui.screens.pin import PinScreen

RECORDED = json.loads((Path(__file__).parent / "data" / "recorded.json").read_text())


class RecordedSource:
    """Replays a daemon's recorded answers; connected at once, then no events. Writes are refused."""

    label = "127.0.0.1:8000"

    def __init__(self, recorded: dict[str, Any]) -> None:
        self.recorded = recorded

    async def status(self) -> Status:
        return Status.model_validate(self.recorded["status"])

    async def info(self) -> ServerInfo:
        return ServerInfo.model_validate(self.recorded["info"])

    async def policy(self) -> PolicyInfo | None:
        return PolicyInfo.model_validate(self.recorded["policy"])

    async def telemetry(self, seconds: float) -> list[dict[str, float | None]]:
        return [parse_sample(s) for s in self.recorded["telemetry"]["samples"]]

    async def knob_ranges(self) -> dict[str, dict[str, Any]]:
        return self.recorded.get("knobs", {}).get("ranges", {})     # recorded before the API had them

    async def requests(self) -> RequestsInfo | None:
        recorded = self.recorded.get("requests")
        return None if recorded is None else RequestsInfo.model_validate(recorded)

    async def decisions(self, limit: int = 200, knob: str | None = None,
                        outcome: str | None = None) -> list[Decision]:
        rows = DecisionList.model_validate(self.recorded["decisions"]).decisions
        return [d for d in rows if knob in (None, d.knob) and outcome in (None, d.outcome)][:limit]

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "connected", {}
        await asyncio.Event().wait()          # a quiet stream: nothing changes after the snapshot

    async def _refuse(self, *args: Any, **kwargs: Any) -> dict:
        raise ApiError(503, "recorded data cannot be changed")

    pin = unpin = set_paused = set_policy = _refuse

    async def aclose(self) -> None:
        pass


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    # decision times are wall-clock times of day: the same on every machine only in one time zone
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def app() -> DashboardApp:
    now = RECORDED["now"]
    return DashboardApp(RecordedSource(RECORDED), clock=lambda: now)


async def shown(pilot) -> None:
    """Wait for the recorded data to be on screen, then freeze what moves (the input cursor's blink)."""
    for _ in range(100):
        if pilot.app.state.live:
            break
        await pilot.pause(0.02)
    pilot.app.redraw()
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_main_screen(snap_compare, size):
    assert snap_compare(app(), terminal_size=size, run_before=shown)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_pin_modal(snap_compare, size):
    async def open_modal(pilot) -> None:
        await shown(pilot)
        await pilot.press("down", "down", "down", "e", "9", "6")     # max_batch_size, a value typed
        assert isinstance(pilot.app.screen, PinScreen)
        await shown(pilot)

    assert snap_compare(app(), terminal_size=size, run_before=open_modal)


def test_recorded_data_is_what_the_screenshots_claim():
    # the screenshots are only worth something if the data shows a pin, policy decisions and bounds
    status = Status.model_validate(RECORDED["status"])
    policy = PolicyInfo.model_validate(RECORDED["policy"])
    decisions = DecisionList.model_validate(RECORDED["decisions"]).decisions
    assert status.pins and policy.bounds and policy.slo
    assert any((d.source or "").startswith("policy:") for d in decisions)
    assert os.environ.get("TZ") == "UTC"
