"""sd_notify(3) over $NOTIFY_SOCKET: one AF_UNIX datagram per message, newline-separated KEY=VALUE lines.

    notifier = Notifier.from_env()
    notifier.notify(extend_timeout(120), status("loading the model"))
    notifier.notify(READY, status("serving"))

Silent when not run by systemd (no $NOTIFY_SOCKET). A failed send is logged once and never raised:
the service must keep serving even if the manager stops listening.
"""

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"
# systemd waits this long for a send before giving up on it: bounded, since WATCHDOG=1 comes from the
# event loop, and a datagram to a listening manager is queued at once.
SEND_TIMEOUT_S = 1.0


def status(text: str) -> str:
    # A newline would end the STATUS= line and turn the rest into (bogus) assignments.
    return "STATUS=" + " ".join(text.splitlines())


def reloading() -> str:
    """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd (Type=notify-reload) requires with it."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def extend_timeout(seconds: float) -> str:
    """Ask for `seconds` more from now before the start (or stop) timeout fires."""
    return f"EXTEND_TIMEOUT_USEC={round(seconds * 1e6)}"


class Notifier:
    """Sends to one notification socket; keeps the socket open and remembers whether it has warned."""

    def __init__(self, address: str | None):
        self.address = address or None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one message; True if it was sent, False when disabled or the send failed."""
        if self.address is None or not lines:
            return False
        try:
            if self.address.startswith("@"):
                target = "\0" + self.address[1:]        # abstract namespace
            elif self.address.startswith("/"):
                target = self.address
            else:
                raise ValueError("unsupported address (want an absolute path or @abstract name)")
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto("\n".join(lines).encode(), target)
            return True
        except (OSError, ValueError) as e:
            level = logging.DEBUG if self._warned else logging.WARNING
            log.log(level, "sd_notify to %r failed: %s (further failures logged at debug level)",
                    self.address, e)
            self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec, as sd_watchdog_enabled(3) advises), or None
    when the watchdog is off or meant for another process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID", "").strip()
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
