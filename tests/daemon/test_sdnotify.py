"""sd_notify over real AF_UNIX datagram sockets: a path in a temp dir and an abstract name."""

import logging
import os
import secrets
import socket
import time

import pytest

from optd.daemon.sdnotify import (
    READY,
    STOPPING,
    WATCHDOG,
    Notifier,
    extend_timeout,
    reloading,
    status,
    watchdog_interval,
)


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def test_messages_arrive_byte_for_byte(listener):
    sock, path = listener
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as n:
        assert n.enabled
        assert n.notify(READY, status("serving demo\nmodel"))
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving demo model"
        assert n.notify(WATCHDOG)
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.notify(STOPPING)
        assert sock.recv(4096) == b"STOPPING=1"
        assert n.notify(extend_timeout(90.5))
        assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=90500000"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.notify(reloading())
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = sock.recv(4096).split(b"\n")
        assert first == b"RELOADING=1" and second.startswith(b"MONOTONIC_USEC=")
        assert before <= int(second.removeprefix(b"MONOTONIC_USEC=")) <= after
        assert n.notify(READY)
        assert sock.recv(4096) == b"READY=1"


def test_abstract_namespace():
    name = f"optd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        with Notifier("@" + name) as n:
            assert n.notify(READY, status("up"))
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_unset_is_a_silent_no_op(caplog):
    n = Notifier.from_env({})
    with caplog.at_level(logging.DEBUG):
        assert not n.enabled and n.notify(READY) is False
    assert caplog.records == []


def test_send_errors_are_logged_once_and_never_raised(tmp_path, caplog):
    n = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="optd.daemon.sdnotify"):
        assert n.notify(READY) is False
        assert n.notify(WATCHDOG) is False
        assert Notifier("relative/path").notify(READY) is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "nobody-listens" in warnings[0] and "unsupported address" in warnings[1]


def test_watchdog_interval():
    me = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
