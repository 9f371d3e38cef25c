"""The dashboard driven by Textual's Pilot against a real daemon (conftest.live): pins through the
modal, pause and resume, refusals shown in the modal, the policy switcher, and the daemon going away
and coming back. The last test restarts the shared daemon, so it stays last in this file.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

from textual.widgets import Input

from optd.tui.app import DashboardApp
from optd.tui.client import DaemonClient
from optd.tui.screens.pin import PinScreen
from optd.tui.screens.policy import PolicyScreen
from tests.tui.conftest import LiveDaemon, until

SIZE = (100, 30)


def drive(live: LiveDaemon, body: Callable[[DashboardApp, object], Awaitable[None]]) -> None:
    """Run the dashboard on `live` until it shows live data, then `body(app, pilot)`."""
    async def main() -> None:
        client = DaemonClient(live.base, live.token)
        app = DashboardApp(client, tick_s=0.25, poll_s=1.0)
        try:
            async with app.run_test(size=SIZE, notifications=True) as pilot:   # toasts, as a user sees them
                await until(pilot, lambda: app.state.live and app.state.status is not None, "live data")
                await body(app, pilot)
        finally:
            await client.aclose()
    asyncio.run(main())


async def status(live: LiveDaemon) -> dict:
    return await asyncio.to_thread(live.get, "/v1/control/status")


def row(app: DashboardApp, knob: str) -> str:
    return next(line for line in app.export_text().splitlines() if line.lstrip().startswith(knob))


def test_pin_through_the_modal_reads_back_from_the_api_and_unpins(live):
    async def body(app: DashboardApp, pilot) -> None:
        await pilot.press("e")                        # the cursor is on the first knob: spec_length
        await until(pilot, lambda: isinstance(app.screen, PinScreen), "the pin modal")
        await pilot.press("2", "tab", *"5m", "tab", *"tui test", "enter")
        modal = app.screen
        await until(pilot, lambda: modal.has_class("confirming"), "the confirmation")
        assert "Pin spec_length from" in app.export_text() and "to 2 for 5m?" in app.export_text()
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, PinScreen), "the modal to close")

        answer = await status(live)
        assert answer["knobs"]["spec_length"] == 2
        pin = answer["pins"]["spec_length"]
        assert pin["value"] == 2 and pin["reason"] == "tui test"
        assert abs(pin["expires_at"] - pin["created_at"] - 300) < 1
        # the screen follows: the pin in the knobs table, the operator's decision in the log
        await until(pilot, lambda: "spec_length" in app.state.status.pins, "the pin on screen")
        reason = "pinned by operator: tui test"
        await until(pilot, lambda: any(d.reason == reason for d in app.state.decisions),
                    "the pin's decision from the event stream")
        await pilot.pause(0.3)
        assert "2 for 4m" in row(app, "spec_length") or "2 for 5m" in row(app, "spec_length")
        assert "pinned by operator: tui test" in app.export_text()

        # `/` filters the log by knob and outcome (through the API's filter too)
        await pilot.press("slash", *"max", "enter")
        await until(pilot, lambda: app.state.knob_filter == "max_batch_size", "the filter")
        await pilot.pause(0.3)
        assert all(d.knob == "max_batch_size" for d in app.state.visible_decisions())
        assert "pinned by operator: tui test" not in app.export_text()
        await pilot.press("slash", *["backspace"] * 20, "enter")
        await until(pilot, lambda: app.state.knob_filter is None, "the filter cleared")

        await pilot.press("u")                        # unpin the knob under the cursor

        async def unpinned() -> bool:
            return "spec_length" not in (await status(live))["pins"]
        await until(pilot, unpinned, "the unpin to reach the daemon")
        await until(pilot, lambda: "spec_length" not in app.state.status.pins, "the unpin on screen")
    drive(live, body)


def test_out_of_range_values_are_refused_in_the_modal(live):
    async def body(app: DashboardApp, pilot) -> None:
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, PinScreen), "the pin modal")
        modal = app.screen
        ranges = (await asyncio.to_thread(live.get, "/v1/control/knobs"))["ranges"]
        assert ranges["spec_length"] == {"min": 0, "max": 8, "integer": True, "supported": True}
        await pilot.press("4", "0", "enter")          # outside spec_length's natural range 0..32
        await pilot.pause(0.2)
        assert "spec_length must be a whole number in 0..8, got 40" in modal.error
        assert not modal.has_class("confirming")
        # 9 is within the natural range but not this engine's envelope (max_spec_length 8): the daemon's
        # ranges (GET knobs) let the modal refuse it before sending
        await pilot.press("backspace", "backspace", "9", "enter")
        await pilot.pause(0.2)
        assert "spec_length must be a whole number in 0..8, got 9" in modal.error
        assert not modal.has_class("confirming")
        # a daemon that reports no ranges (older than them): the daemon refuses 9, and the modal shows its
        # words and stays open
        modal.ranges = {}
        await pilot.press("enter")
        await until(pilot, lambda: modal.has_class("confirming"), "the confirmation")
        await pilot.press("enter")
        await until(pilot, lambda: "the daemon refused" in modal.error, "the daemon's refusal")
        assert "spec_length must be in 0..8" in modal.error
        assert app.screen is modal and not modal.has_class("confirming")
        assert "spec_length" not in (await status(live))["pins"]
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, PinScreen), "the modal to close")

        # the modal pins the knob under the cursor: max_batch_size is the fourth row
        await pilot.press("down", "down", "down", "e")
        await until(pilot, lambda: isinstance(app.screen, PinScreen), "the pin modal")
        modal = app.screen
        assert "max_batch_size:" in app.export_text()
        await pilot.press("0", "enter", "tab", *"-5", "enter")
        await pilot.pause(0.2)
        most = ranges["max_batch_size"]["max"]
        assert f"max_batch_size must be a whole number in 1..{most}, got 0" in modal.error
        await pilot.press("shift+tab", "backspace", "3", "enter")      # a good value, a bad TTL
        await pilot.pause(0.2)
        assert modal.error.startswith("ttl:") and not modal.has_class("confirming")
        await pilot.press("escape")
        assert (await status(live))["pins"] == {}
    drive(live, body)


def test_pause_and_resume(live):
    async def body(app: DashboardApp, pilot) -> None:
        await pilot.press("p")

        async def paused() -> bool:
            return (await status(live))["paused"]
        await until(pilot, paused, "the daemon to be paused")
        await until(pilot, lambda: "PAUSED" in app.export_text().splitlines()[0], "PAUSED in the header")
        await pilot.press("p")

        async def resumed() -> bool:
            return not (await status(live))["paused"]
        await until(pilot, resumed, "the daemon to resume")
        await until(pilot, lambda: "auto" in app.export_text().splitlines()[0], "auto in the header")
    drive(live, body)


def test_policy_switch_and_an_invalid_policy(live, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: optd/v1\nkind: Policy\nmetadata: {name: bad}\nspec:\n  bogus: 1\n")

    async def body(app: DashboardApp, pilot) -> None:
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, PolicyScreen), "the policy modal")
        assert "throughput" in app.export_text() and "balanced  (running)" in app.export_text()
        await pilot.press("end", "enter")            # presets are sorted: throughput is last
        await until(pilot, lambda: not isinstance(app.screen, PolicyScreen), "the switch")
        assert (await asyncio.to_thread(live.get, "/v1/control/policy"))["name"] == "throughput"
        await until(pilot, lambda: "policy throughput" in app.export_text().splitlines()[0],
                    "the header to name the new policy")

        await pilot.press("s")                        # a YAML file with an unknown key
        await until(pilot, lambda: isinstance(app.screen, PolicyScreen), "the policy modal")
        modal = app.screen
        modal.query_one("#other", Input).value = str(bad)     # (typed out, it is just slower)
        await pilot.press("tab", "enter")
        await until(pilot, lambda: "refused" in modal.error, "the daemon's refusal")
        assert "bogus" in modal.error and app.screen is modal
        assert (await asyncio.to_thread(live.get, "/v1/control/policy"))["name"] == "throughput"
        await pilot.press("escape", "s")              # back to balanced, picked from the list
        await until(pilot, lambda: isinstance(app.screen, PolicyScreen), "the policy modal")
        await pilot.press("home", "enter")            # presets are sorted: balanced is first
        await until(pilot, lambda: not isinstance(app.screen, PolicyScreen), "the switch back")
        assert (await asyncio.to_thread(live.get, "/v1/control/policy"))["name"] == "balanced"
    drive(live, body)


def too_long_prompt(live: LiveDaemon) -> tuple[int, str]:
    """A completion whose prompt is longer than any max_model_len: the daemon rejects it (400)."""
    body = json.dumps({"model": "demo", "prompt": [1] * 5000, "max_tokens": 1}).encode()
    request = urllib.request.Request(live.base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]
    raise AssertionError("a 5000-token prompt was accepted")


def test_a_rejected_request_shows_in_the_requests_panel(live):
    async def body(app: DashboardApp, pilot) -> None:
        code, message = await asyncio.to_thread(too_long_prompt, live)
        assert code == 400 and message.startswith("prompt has 5000 tokens")
        latest = (await asyncio.to_thread(live.get, "/v1/control/requests"))["recent_errors"][0]
        assert (latest["status"], latest["endpoint"], latest["error"]) == ("rejected", "completions", message)
        # the panel reads GET requests on its poll: the rejection appears with its reason
        await until(pilot, lambda: "rejected completions: prompt has 5000 tokens" in app.export_text(),
                    "the rejection in the requests panel")
        assert "failed rejected" in app.export_text()
    drive(live, body)


def test_daemon_going_away_shows_disconnected_and_a_restart_recovers(live):
    async def body(app: DashboardApp, pilot) -> None:
        await asyncio.to_thread(live.stop)
        await until(pilot, lambda: app.state.connection == "disconnected", "the disconnected state")
        # The redraw, not a fixed pause (under load it can take longer than 0.3 s).
        await until(pilot, lambda: "daemon unreachable" in app.export_text(), "the disconnected screen")
        screen = app.export_text()
        assert "DISCONNECTED" in screen.splitlines()[0] and "daemon unreachable" in screen
        assert "spec_length" in screen               # the last data stays on screen
        await pilot.press("p")                        # a write while disconnected fails, visibly
        await until(pilot, lambda: "cannot reach the daemon" in app.export_text(), "the failure's toast")

        await asyncio.to_thread(live.start_again)     # same port, as a restarted service
        await until(pilot, lambda: app.state.live, "the reconnect", timeout=60)

        def live_again() -> bool:
            screen = app.export_text()
            return "● live" in screen.splitlines()[0] and "daemon unreachable" not in screen
        await until(pilot, live_again, "the live screen again")
    drive(live, body)
