"""`optd top` in a real terminal: tmux runs it at 100×30 against the shared live daemon; keys go in with
send-keys and the screen comes back with capture-pane."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """One tmux server of our own (its own socket), so that nobody else's sessions are touched."""

    def __init__(self) -> None:
        self.socket = f"optd-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top").stdout

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if condition(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")


def test_optd_top_in_tmux(live):
    tmux = Tmux()
    command = (f"{sys.executable} -m optd.daemon.cli top --url {live.base} --state-dir {live.state}; "
               "echo optd-top-exited-$?; sleep 30")
    started = tmux("new-session", "-d", "-s", "top", "-x", "100", "-y", "30", "-e", "TERM=xterm-256color",
                   command)
    assert started.returncode == 0, started.stderr
    try:
        screen = tmux.wait_for(lambda s: "● live" in s, "the dashboard to connect")
        for expected in ("spec_length", "max_batch_size", "policy balanced", "tokens/s", "p pause/resume"):
            assert expected in screen
        assert all(len(line) <= 100 for line in screen.splitlines())

        tmux("send-keys", "-t", "top", "p")
        tmux.wait_for(lambda s: "PAUSED" in s.splitlines()[0], "PAUSED in the header")
        assert live.get("/v1/control/status")["paused"] is True
        tmux("send-keys", "-t", "top", "p")
        tmux.wait_for(lambda s: "auto" in s.splitlines()[0], "auto in the header")
        assert live.get("/v1/control/status")["paused"] is False

        tmux("send-keys", "-t", "top", "?")
        tmux.wait_for(lambda s: "pause / resume automation" in s, "the help screen")
        tmux("send-keys", "-t", "top", "Escape")
        # (an Escape followed at once by q reads as alt+q: wait for the help to close first)
        tmux.wait_for(lambda s: "pause / resume automation" not in s, "the help screen to close")
        tmux("send-keys", "-t", "top", "q")
        tmux.wait_for(lambda s: "optd-top-exited-0" in s, "optd top to exit 0")
    finally:
        tmux("kill-server")
