"""A real daemon for the dashboard's live tests: `optd serve --demo --policy balanced` (the demo model
with its built-in load, so the charts move and the policy decides), on a free port with a state
directory of its own. One per package: the live tests and the tmux test share it. `restart()` stops
it and starts it again on the same port, as an operator restarting the service would.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.daemon.test_serve_lifecycle import Daemon, kill, start

ARGS = ("--demo", "--policy", "balanced")


class LiveDaemon:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.current: Daemon = start(state, *ARGS)

    @property
    def base(self) -> str:
        return self.current.base

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    @property
    def token(self) -> str:
        return (self.state / "control.token").read_text().strip()

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        assert self.current.stop() == 0

    def start_again(self) -> None:
        self.current = start(self.state, *ARGS, "--port", str(self.port))


@pytest.fixture(scope="package")
def live(tmp_path_factory) -> LiveDaemon:
    daemon = LiveDaemon(tmp_path_factory.mktemp("tui-daemon"))
    yield daemon
    kill(daemon.current)


async def until(pilot, condition: Callable[[], bool | Awaitable[bool]], what: str,
                timeout: float = 30.0) -> None:
    """Let the app run until `condition()` holds; fail naming `what` if it does not within `timeout`
    (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.1)

