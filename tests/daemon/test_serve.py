"""`optd serve` as systemd runs it: a real process, a real NOTIFY_SOCKET, SIGTERM while streaming."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.daemon.test_serve_lifecycle import committed_samples, wait_for


@pytest.fixture
def daemon(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    command = [sys.executable, "-m", "optd.daemon.cli", "serve", "--state-dir", str(tmp_path), "--port", "0"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    messages = []
    while not any("READY=1" in m for m in messages):
        messages.append(notify.recv(4096).decode())
    status = next(m for m in messages if "READY=1" in m)
    port = int(status.rsplit(":", 1)[1].split()[0])
    yield proc, f"http://127.0.0.1:{port}", notify, messages, tmp_path
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def post(url: str, body: dict):
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    return urllib.request.urlopen(req, timeout=60)


def test_serves_records_and_drains_on_sigterm(daemon):
    proc, base, notify, messages, state = daemon
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages)  # asked for time while loading
    with post(base + "/v1/completions", {"model": "demo", "prompt": "def f", "max_tokens": 5}) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 5
    wait_for(lambda: committed_samples(state / "optd.db"), "a telemetry sample in the database")
    assert (state / "control.token").stat().st_mode & 0o777 == 0o600

    stream = post(base + "/v1/completions", {"model": "demo", "prompt": "import", "max_tokens": 200,
                                              "stream": True})
    assert stream.readline().startswith(b"data: ")  # the request is in flight
    proc.send_signal(signal.SIGTERM)
    rest = stream.read().decode()
    finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest.splitlines()
              if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]") and finish[-1] in ("length", "stop")  # not aborted
    assert proc.wait(timeout=60) == 0
    stopping = []
    notify.settimeout(5)
    while not any("STOPPING=1" in m for m in stopping):
        stopping.append(notify.recv(4096).decode())
    with sqlite3.connect(state / "optd.db") as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_a_pin_through_the_control_api_survives_a_restart(tmp_path, daemon):
    proc, base, _, _, state = daemon
    token = (state / "control.token").read_text().strip()
    body = json.dumps({"value": 3, "reason": "test"}).encode()
    unauthorized = urllib.request.Request(base + "/v1/control/knobs/max_batch_size", data=body, method="PUT",
                                          headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(unauthorized, timeout=30)
    assert err.value.code == 401
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    pin = urllib.request.Request(base + "/v1/control/knobs/max_batch_size", data=body, method="PUT",
                                 headers=headers)
    urllib.request.urlopen(pin, timeout=30).read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    command = [sys.executable, "-m", "optd.daemon.cli", "serve", "--state-dir", str(state), "--port", "0"]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "again.sock"))
    notify.settimeout(120)
    again = subprocess.Popen(command, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "again.sock")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while "READY=1" not in (message := notify.recv(4096).decode()):
            pass
        port = int(message.rsplit(":", 1)[1].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/control/status", timeout=30) as r:
            status = json.loads(r.read())
        assert status["knobs"]["max_batch_size"] == 3 and "max_batch_size" in status["pins"]
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0


def test_cli_clients_against_the_daemon(daemon):
    _, base, _, _, state = daemon

    def optd(*args):
        common = ["--url", base, "--state-dir", str(state)]
        return subprocess.run([sys.executable, "-m", "optd.daemon.cli", *args[:1], *common, *args[1:]],
                              capture_output=True, text=True, timeout=60)

    pinned = optd("knobs", "set", "max_batch_size", "2", "--reason", "cli test")
    assert pinned.returncode == 0 and "max_batch_size pinned at 2" in pinned.stdout
    shown = optd("status", "--json")
    assert json.loads(shown.stdout)["knobs"]["max_batch_size"] == 2
    refused = optd("knobs", "set", "max_batch_size", "0")
    assert refused.returncode == 2 and "max_batch_size must be in 1.." in refused.stderr
    assert optd("pause").stdout.strip() == "automation paused"
    assert json.loads(optd("status", "--json").stdout)["paused"] is True
    assert optd("resume").returncode == 0
    assert "cli test" in optd("decisions").stdout
    assert optd("knobs", "unpin", "max_batch_size").returncode == 0
    command = [sys.executable, "-m", "optd.daemon.cli", "pause", "--url", base, "--token", "x" * 20]
    wrong = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "401" in wrong.stderr
