"""`optd serve` over its lifetime, as systemd runs it: SIGHUP reloads, SIGKILL and restart, PostgreSQL.

Each test starts the real daemon (demo model, a free port, a state directory of its own) with
NOTIFY_SOCKET bound to an AF_UNIX datagram socket here, and talks to it over HTTP.

The PostgreSQL test runs against the server on 127.0.0.1:5432 (user `postgres`, trust auth; override
with OPTD_TEST_PG_ADMIN), in a database created for the run and dropped after it; it is skipped, saying
why, when the server is unreachable.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_ADMIN = os.environ.get("OPTD_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
# Samples every 0.2 s, committed every 0.2 s: crash and store tests see rows within a second.
FAST_TELEMETRY = "telemetry:\n  interval_s: 0.2\nstore:\n  flush_interval_s: 0.2\n"


@dataclass
class Daemon:
    proc: subprocess.Popen
    base: str
    notify: socket.socket
    state: Path
    log: Path

    def messages_until(self, key: str, timeout: float = 120.0) -> list[str]:
        """Notification messages up to and including the first that has the line `key`; fails with the
        daemon's log if it exits or `timeout` passes first."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            got.append(message)
            if key in message.splitlines():
                return got
        raise AssertionError(f"no {key} (exit code {self.proc.poll()}, got {got}); the daemon said:\n"
                             f"{self.log.read_text()[-3000:]}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def send(self, method: str, path: str, body: dict | None = None, token: bool = True) -> dict:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {(self.state / 'control.token').read_text().strip()}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def complete(self) -> dict:
        return self.send("POST", "/v1/completions", {"model": "demo", "prompt": "def f", "max_tokens": 3},
                         token=False)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.notify.close()


def start(state: Path, *args: str) -> Daemon:
    """`optd serve --state-dir state --port 0 ARGS`, waited on until READY=1."""
    state.mkdir(parents=True, exist_ok=True)
    sock_path = state / f"notify-{uuid.uuid4().hex[:8]}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(0.5)    # short, to notice a daemon that exits instead
    log = state / f"serve-{uuid.uuid4().hex[:8]}.log"
    command = [sys.executable, "-m", "optd.daemon.cli", "serve", "--state-dir", str(state), "--port", "0",
               *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
                                stdout=out, stderr=subprocess.STDOUT)
    daemon = Daemon(proc, "", notify, state, log)
    try:
        ready = daemon.messages_until("READY=1")[-1]
    except AssertionError:
        kill(daemon)
        raise
    port = int(ready.rsplit(":", 1)[1].split()[0])    # STATUS=serving demo on 127.0.0.1:PORT
    daemon.base = f"http://127.0.0.1:{port}"
    return daemon


def kill(daemon: Daemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.kill()
    daemon.proc.wait(timeout=30)
    daemon.notify.close()


def status_line(message: str) -> str:
    return next(line for line in message.splitlines() if line.startswith("STATUS="))


def monotonic_usec() -> int:
    return time.monotonic_ns() // 1000     # CLOCK_MONOTONIC on Linux: the clock systemd wants


def reload(daemon: Daemon) -> tuple[str, str]:
    """SIGHUP; returns the RELOADING=1 message and the READY=1 message that ends the reload, after
    checking MONOTONIC_USEC was taken between the signal and READY=1."""
    before = monotonic_usec()
    daemon.proc.send_signal(signal.SIGHUP)
    messages = daemon.messages_until("READY=1")
    after = monotonic_usec()
    reloading = next(m for m in messages if "RELOADING=1" in m.splitlines())
    usec = dict(line.split("=", 1) for line in reloading.splitlines())["MONOTONIC_USEC"]
    assert before <= int(usec) <= after
    return reloading, messages[-1]


# ---------------------------------------------------------------------------------------------------
# SIGHUP


def test_sighup_reloads_what_it_can_and_keeps_serving_through_a_broken_file(tmp_path):
    config = tmp_path / "optd.yaml"
    config.write_text("knobs:\n  max_batch_size: 4\n")
    daemon = start(tmp_path / "state", "--config", str(config))
    try:
        assert daemon.get("/v1/control/knobs")["knobs"]["max_batch_size"] == 4

        # A knob and the admission bound apply at once; the engine envelope and the token need a
        # restart (the token is named, never shown).
        secret = "a-new-secret-control-token"
        config.write_text("engine:\n  max_num_seqs: 32\nknobs:\n  max_batch_size: 2\nserver:\n"
                          f"  max_waiting: 0\n  control_token: {secret}\n")
        _, ready = reload(daemon)
        status = status_line(ready)
        assert "knobs.max_batch_size=2" in status and "server.max_waiting=0" in status
        assert "needs a restart: engine.max_num_seqs, server.control_token" in status
        assert secret not in status and secret not in daemon.log.read_text()
        knobs = daemon.get("/v1/control/knobs")
        assert knobs["knobs"]["max_batch_size"] == 2 and knobs["configured"]["max_batch_size"] == 2
        decision = daemon.get("/v1/control/decisions?knob=max_batch_size")["decisions"][0]
        assert decision["reason"] == "configuration reloaded" and decision["new_value"] == 2
        with pytest.raises(urllib.error.HTTPError) as refused:   # max_waiting 0: no room to wait
            daemon.complete()
        assert refused.value.code == 429

        # A pinned knob keeps its pin; the new configured value is where an unpin goes back to. The
        # envelope change is still pending: later reloads compare with what runs, not with the file.
        # The token in force is still the generated one.
        daemon.send("PUT", "/v1/control/knobs/max_batch_size", {"value": 3, "reason": "test"})
        config.write_text("engine:\n  max_num_seqs: 32\nknobs:\n  max_batch_size: 5\n")
        _, ready = reload(daemon)
        status = status_line(ready)
        assert "knobs.max_batch_size=5 (pinned at 3" in status and "server.max_waiting=256" in status
        assert "needs a restart: engine.max_num_seqs" in status
        knobs = daemon.get("/v1/control/knobs")
        assert knobs["knobs"]["max_batch_size"] == 3 and knobs["configured"]["max_batch_size"] == 5
        assert daemon.complete()["usage"]["completion_tokens"] == 3
        daemon.send("DELETE", "/v1/control/knobs/max_batch_size")
        assert daemon.get("/v1/control/knobs")["knobs"]["max_batch_size"] == 5

        # A broken file changes nothing and says where it is broken; the daemon still reports READY=1.
        config.write_text("engine:\n  max_num_seqs: 32\nknobs:\n  max_batch_size: 0\n")
        _, ready = reload(daemon)
        status = status_line(ready)
        assert status.startswith("STATUS=reload failed, running configuration kept:")
        assert f"{config}:4: knobs.max_batch_size" in status
        knobs = daemon.get("/v1/control/knobs")
        assert knobs["knobs"]["max_batch_size"] == 5 and knobs["configured"]["max_batch_size"] == 5
        assert daemon.complete()["usage"]["completion_tokens"] == 3
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
    finally:
        kill(daemon)
    assert "reload failed" in daemon.log.read_text()       # the log has it too


# ---------------------------------------------------------------------------------------------------
# Crash safety


def committed_samples(db: Path) -> dict[int, float]:
    """id -> ts of the samples committed to the SQLite file, read through a read-only connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT id, ts FROM samples"))
    finally:
        conn.close()


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def test_sigkill_keeps_committed_samples_and_a_restart_serves_and_appends(tmp_path):
    config = tmp_path / "optd.yaml"
    config.write_text(FAST_TELEMETRY)
    state = tmp_path / "state"
    db = state / "optd.db"
    daemon = start(state, "--config", str(config))
    try:
        daemon.complete()

        def five_committed() -> dict[int, float] | None:
            rows = committed_samples(db)
            return rows if len(rows) >= 5 else None

        seen = wait_for(five_committed, "5 committed samples")
        os.kill(daemon.proc.pid, signal.SIGKILL)      # while it keeps sampling and committing
        assert daemon.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        kill(daemon)

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    after_kill = committed_samples(db)
    assert seen.items() <= after_kill.items()        # every row seen committed is still there, unchanged

    again = start(state, "--config", str(config))
    try:
        assert again.complete()["usage"]["completion_tokens"] == 3
        wait_for(lambda: max(committed_samples(db)) > max(after_kill), "a sample after the restart")
        assert again.stop() == 0
    finally:
        kill(again)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    assert after_kill.items() <= committed_samples(db).items()


# ---------------------------------------------------------------------------------------------------
# PostgreSQL


@pytest.fixture
def pg_database():
    """A PostgreSQL database of its own for this test, dropped afterwards; yields its SQLAlchemy URL."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN}: {e}")
    name = f"optd_test_{uuid.uuid4().hex[:12]}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        info = admin.info
        yield f"postgresql+psycopg://{info.user}@{info.host}:{info.port}/{name}"
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def test_postgresql_store_upgrades_records_samples_and_keeps_pins(tmp_path, pg_database):
    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    from optd.daemon import db

    config = tmp_path / "optd.yaml"
    config.write_text(FAST_TELEMETRY)
    daemon = start(tmp_path / "first", "--config", str(config), "--db", pg_database)
    engine = sa.create_engine(pg_database)
    try:
        head = ScriptDirectory.from_config(db.alembic_config(pg_database)).get_current_head()
        assert db.current(pg_database) == head                    # serve upgraded the schema

        def samples() -> int:
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT count(*) FROM samples")).scalar_one()

        wait_for(lambda: samples() >= 3, "samples in PostgreSQL")
        daemon.send("PUT", "/v1/control/knobs/max_batch_size", {"value": 3, "reason": "pg test"})
        with engine.connect() as conn:
            pinned = conn.execute(sa.text("SELECT knob FROM pins")).scalars().all()
        assert pinned == ["max_batch_size"]
        assert daemon.stop() == 0
    finally:
        kill(daemon)

    # Another state directory: the pin can only come from the database.
    again = start(tmp_path / "second", "--config", str(config), "--db", pg_database)
    try:
        status = again.get("/v1/control/status")
        assert status["knobs"]["max_batch_size"] == 3 and "max_batch_size" in status["pins"]
        before = samples()
        wait_for(lambda: samples() > before, "samples after the restart")
        assert again.stop() == 0
    finally:
        kill(again)
        engine.dispose()
