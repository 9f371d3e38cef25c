"""The MQTT bridge against a real broker and real `optd serve --mqtt ...` processes.

Broker: Mosquitto at 127.0.0.1:1883 when it answers, else an in-process amqtt broker (skipped when
neither is there). Every run uses its own topic prefix and node names, and clears its retained topics
at the end. Three daemons share the module: A (signed commands) and B (unsigned) on the shared broker,
C on a private broker of its own that the restart test stops and starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from optd.daemon.config import ConfigError, load_config
from optd.daemon.mqtt import backoff
from optd.daemon.mqtt_commands import CommandHandler, canonical, sign
from optd.daemon.mqtt_outbox import Outbox, Outgoing
from tests.daemon.ports import free_port

mqtt = pytest.importorskip("paho.mqtt.client")

RUN = uuid.uuid4().hex[:8]
PREFIX = f"optdtest/{RUN}"
SECRET = f"fleet-secret-{RUN}"
WAIT_S = 60.0           # upper bound on any wait: a failure, never a timing assertion


# -- brokers -----------------------------------------------------------------------------------------

def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while not _listening(port):
        assert time.monotonic() < deadline, f"no broker came up on port {port}"
        time.sleep(0.05)


class AmqttBroker:
    """amqtt's broker on its own event loop in a thread (for machines without Mosquitto)."""

    def __init__(self, port: int) -> None:
        from amqtt.broker import Broker

        self.port = port
        self._config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                    {"allow_anonymous": True}}}
        self._make = Broker
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._broker = None

    def start(self) -> None:
        async def start():      # amqtt's Broker wants its loop running when it is made
            self._broker = self._make(self._config)
            await self._broker.start()

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(20)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(20)


class MosquittoBroker:
    """A Mosquitto of our own on a free port (no persistence: a restart forgets retained messages)."""

    def __init__(self, port: int, binary: str) -> None:
        self.port, self.binary, self.proc = port, binary, None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _wait_listening(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def _private_broker() -> MosquittoBroker | AmqttBroker:
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if binary:
        return MosquittoBroker(free_port(), binary)
    pytest.importorskip("amqtt", reason="neither mosquitto nor amqtt is installed")
    return AmqttBroker(free_port())


@pytest.fixture(scope="module")
def broker_port():
    if _listening(1883):
        yield 1883
        return
    pytest.importorskip("amqtt", reason="no Mosquitto at 127.0.0.1:1883 and amqtt is not installed")
    broker = AmqttBroker(free_port())
    broker.start()
    yield broker.port
    broker.stop()


# -- an MQTT observer --------------------------------------------------------------------------------

class Watcher:
    """A paho client that records every message under `PREFIX` (retained ones included)."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S)

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def wait(self, topic: str, match: Callable[[bytes], bool] = lambda _: True, since: int = 0) -> bytes:
        def found():
            return next((p for t, p, _ in self.messages[since:] if t == topic and match(p)), None)

        with self._cond:
            payload = self._cond.wait_for(found, WAIT_S)
        seen = [t for t, *_ in self.messages[since:]]
        assert payload is not None, f"nothing on {topic} matched; got {seen}"
        return payload

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- daemons -----------------------------------------------------------------------------------------

class Daemon:
    def __init__(self, tmp: Path, node: str, port: int, **mqtt_config) -> None:
        self.node, self.state = node, tmp / node
        self.state.mkdir()
        config = {"mqtt": {"node": node, "topic_prefix": PREFIX, "reconnect_max_s": 1.0, **mqtt_config}}
        (self.state / "optd.yaml").write_text(json.dumps(config))    # JSON is YAML
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.state / "notify.sock"))
        self.notify.settimeout(180)
        command = [sys.executable, "-m", "optd.daemon.cli", "serve", "--state-dir", str(self.state),
                   "--port", "0", "--config", str(self.state / "optd.yaml"),
                   "--mqtt", f"mqtt://127.0.0.1:{port}"]
        self.log = open(self.state / "daemon.log", "wb")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.state / "notify.sock")}
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = ""

    def ready(self) -> Daemon:
        while "READY=1" not in (message := self.notify.recv(4096).decode()):
            pass
        self.base = f"http://127.0.0.1:{int(message.rsplit(':', 1)[1].split()[0])}"
        self.token = (self.state / "control.token").read_text().strip()
        return self

    def topic(self, leaf: str) -> str:
        return f"{PREFIX}/{self.node}/{leaf}"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.notify.close()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, broker_port):
    tmp = tmp_path_factory.mktemp("mqtt")
    private = _private_broker()
    private.start()
    # All three load their models at once: the slow part, shared by every test here.
    daemons = {"a": Daemon(tmp, f"a-{RUN}", broker_port, commands=True, hmac_secret=SECRET, hmac_window_s=30),
               "b": Daemon(tmp, f"b-{RUN}", broker_port, commands=True),
               "c": Daemon(tmp, f"c-{RUN}", private.port)}
    watcher = Watcher(broker_port)
    try:
        for d in daemons.values():
            d.ready()
        yield daemons, watcher, private
    finally:
        for d in daemons.values():
            d.stop()
        for d in daemons.values():                  # leave no retained state on a shared broker
            for leaf in ("status", "knobs"):
                watcher.publish(d.topic(leaf), b"", retain=True)
        watcher.close()
        with contextlib.suppress(Exception):
            private.stop()


def _result(watcher: Watcher, daemon: Daemon, cmd_id, since: int) -> dict:
    payload = watcher.wait(daemon.topic("cmd/result"), lambda p: json.loads(p)["id"] == cmd_id, since)
    return json.loads(payload)


def _signed(body: dict, secret: str = SECRET, ts: float | None = None) -> bytes:
    body = {**body, "ts": time.time() if ts is None else ts}
    return json.dumps({**body, "hmac": sign(body, secret)}).encode()


# -- pure parts --------------------------------------------------------------------------------------

def test_outbox_drops_the_oldest_telemetry_first_and_never_blocks():
    dropped: list[Outgoing] = []
    box = Outbox(3, on_drop=dropped.append)
    box.put(Outgoing("telemetry", "t", b"1"))
    box.put(Outgoing("decision", "d", b"d1", qos=1))
    box.put(Outgoing("telemetry", "t", b"2"))
    box.put(Outgoing("knobs", "k", b"k1", qos=1, retain=True))       # full: sample 1 goes
    box.put(Outgoing("knobs", "k", b"k2", qos=1, retain=True))       # replaces k1 (only the newest state)
    box.put(Outgoing("result", "r", b"r1", qos=1))                   # full: sample 2 goes
    box.put(Outgoing("result", "r", b"r2", qos=1))                   # no telemetry left: the oldest other
    assert [m.payload for m in dropped] == [b"1", b"2", b"d1"] and box.dropped == 3
    assert [box.get_nowait().payload for _ in range(3)] == [b"k2", b"r1", b"r2"]
    assert box.get_nowait() is None
    box.requeue(Outgoing("telemetry", "t", b"3"))                    # a failed sample is not retried
    assert box.get_nowait() is None and dropped[-1].payload == b"3"


def test_backoff_doubles_with_jitter_up_to_the_cap():
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 30.0), (500, 30.0)]:
        delays = [backoff(attempt, cap=30.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len({backoff(4, 30.0) for _ in range(20)}) > 1            # jittered


def test_canonical_form_of_a_signed_command():
    body = {"id": "x", "action": "pause", "ts": 1700000000, "note": "é", "hmac": "ignored"}
    assert canonical(body) == '{"action":"pause","id":"x","note":"é","ts":1700000000}'.encode()


def test_a_command_delivered_as_retained_is_not_obeyed():
    # The broker sends a stored (retained) command at every new subscription, so at every reconnect.
    handler = CommandHandler(control=None, node="n")    # refused before any action could run
    reply = asyncio.run(handler.handle(json.dumps({"id": 1, "action": "pause"}).encode(), retained=True))
    assert reply == {"id": 1, "node": "n", "action": "pause", "outcome": "refused", "result": None,
                     "reason": "retained commands are not obeyed (publish cmd/set with retain=false)"}
    assert handler.refused == 1 and handler.ok == 0


def test_mqtt_config_errors_name_the_field(tmp_path):
    cases = {"ftp://broker": "mqtt.url: must be mqtt://HOST[:PORT] or mqtts://",
             "mqtt://broker:99999": "mqtt.url: has an invalid port",
             "mqtt://:1883": "mqtt.url: has no host"}
    for url, message in cases.items():
        with pytest.raises(ConfigError, match="^" + re.escape(f"command line: {message}")):
            load_config(None, {"mqtt": {"url": url}}, default_path=tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match=r"mqtt\.node: 'all' is the fleet-wide topic level"):
        load_config(None, {"mqtt": {"node": "all"}}, default_path=tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match=r"mqtt\.topic_prefix: must be topic levels"):
        load_config(None, {"mqtt": {"topic_prefix": "optd/#"}}, default_path=tmp_path / "none.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(None, {"mqtt": {"password": 12345}}, default_path=tmp_path / "none.yaml")
    assert "12345" not in str(e.value)                                 # secrets are never echoed


# -- the daemons -------------------------------------------------------------------------------------

def test_status_telemetry_and_knobs_arrive(fleet, broker_port):
    daemons, watcher, _ = fleet
    a = daemons["a"]
    assert watcher.wait(a.topic("status"), lambda p: p == b"online")
    sample = json.loads(watcher.wait(a.topic("telemetry")))
    assert {"ts", "tokens_per_s", "ttft_p95", "kv_usage", "max_batch_size"} <= set(sample)
    knobs = json.loads(watcher.wait(a.topic("knobs")))
    assert knobs["node"] == a.node and knobs["model"] == "demo" and knobs["paused"] is False
    assert set(knobs["knobs"]) == {"spec_length", "kv_compression", "weight_bits", "max_batch_size"}
    # A subscriber that comes later gets the retained state at once.
    late = Watcher(broker_port)
    try:
        assert late.wait(a.topic("status")) == b"online" and late.wait(a.topic("knobs"))
        assert all(retained for topic, _, retained in late.messages if topic == a.topic("status"))
    finally:
        late.close()
    text = a.metrics()
    assert _metric(text, 'optd_mqtt_messages_sent_total{kind="telemetry"}') >= 1
    assert _metric(text, f'optd_mqtt_connected{{node="{a.node}"}}') == 1


def test_a_signed_pin_over_mqtt_shows_in_the_http_status(fleet):
    daemons, watcher, _ = fleet
    a = daemons["a"]
    since = watcher.mark()
    watcher.publish(a.topic("cmd/set"), _signed({"id": "pin-1", "action": "pin", "knob": "max_batch_size",
                                                  "value": 5, "reason": "mqtt test"}))
    reply = _result(watcher, a, "pin-1", since)
    assert reply["outcome"] == "ok" and reply["reason"] is None and reply["result"]["value"] == 5
    status = a.get("/v1/control/status")
    assert status["knobs"]["max_batch_size"] == 5
    assert status["pins"]["max_batch_size"]["source"] == "mqtt"
    decision = json.loads(watcher.wait(a.topic("decisions"), since=since))
    assert (decision["knob"], decision["new_value"], decision["source"]) == ("max_batch_size", 5, "mqtt")
    knobs = json.loads(watcher.wait(a.topic("knobs"), lambda p: json.loads(p)["knobs"]["max_batch_size"] == 5,
                                    since))
    assert "max_batch_size" in knobs["pins"]

    since = watcher.mark()
    unpin = {"action": "unpin", "knob": "max_batch_size"}
    watcher.publish(a.topic("cmd/set"), _signed({"id": "unpin-1", **unpin}))
    assert _result(watcher, a, "unpin-1", since)["outcome"] == "ok"
    assert a.get("/v1/control/status")["pins"] == {}


def test_bad_commands_are_refused_with_a_reason_and_change_nothing(fleet):
    daemons, watcher, _ = fleet
    a = daemons["a"]
    before = a.get("/v1/control/status")
    pin = {"action": "pin", "knob": "max_batch_size", "value": 7}
    signed_pin = json.loads(_signed({"id": "replay", **pin}))
    cases = [
        (None, b"{not json", "not valid JSON"),
        (None, b"[1, 2]", "a command must be a JSON object"),
        ("no-hmac", json.dumps({"id": "no-hmac", **pin, "ts": time.time()}).encode(), "hmac: missing"),
        ("no-ts", json.dumps({"id": "no-ts", **pin, "hmac": "0" * 64}).encode(), "ts: missing"),
        ("wrong", _signed({"id": "wrong", **pin}, secret="not-the-secret"), "hmac: does not match"),
        ("stale", _signed({"id": "stale", **pin}, ts=time.time() - 3600), "outside the 30s window"),
        ("unknown", _signed({"id": "unknown", "action": "reboot"}), "action: unknown 'reboot'"),
        ("no-knob", _signed({"id": "no-knob", "action": "pin", "value": 3}), "knob: Field required"),
        ("extra", _signed({"id": "extra", **pin, "force": True}), "force: unknown field"),
        ("bad-knob", _signed({"id": "bad-knob", **pin, "knob": "warp_drive"}), "unknown knob 'warp_drive'"),
        ("bad-value", _signed({"id": "bad-value", **pin, "value": 0}), "max_batch_size"),
        ("policy", _signed({"id": "policy", "action": "set_policy", "name": "nope"}), "nope"),
    ]
    refused_before = _metric(a.metrics(), 'optd_mqtt_commands_total{outcome="refused"}')
    for cmd_id, payload, reason in cases:
        since = watcher.mark()
        watcher.publish(a.topic("cmd/set"), payload)
        if cmd_id is None:      # no id to match the reply by: the next refusal without one
            payload = watcher.wait(a.topic("cmd/result"), lambda p: json.loads(p)["id"] is None, since)
            reply = json.loads(payload)
        else:
            reply = _result(watcher, a, cmd_id, since)
        assert reply["outcome"] == "refused" and reason in reply["reason"], (cmd_id, reply)
        assert reply["result"] is None
    # A replay of an accepted signed command is refused too.
    for expected in ("ok", "refused"):
        since = watcher.mark()
        watcher.publish(a.topic("cmd/set"), json.dumps(signed_pin).encode())
        reply = _result(watcher, a, "replay", since)
        assert reply["outcome"] == expected, reply
    assert "replayed" in reply["reason"]

    after = a.get("/v1/control/status")
    assert after["knobs"]["max_batch_size"] == 7 and after["paused"] is False     # only the accepted pin
    assert {k: v for k, v in after["knobs"].items() if k != "max_batch_size"} == \
        {k: v for k, v in before["knobs"].items() if k != "max_batch_size"}
    refused = _metric(a.metrics(), 'optd_mqtt_commands_total{outcome="refused"}') - refused_before
    assert refused == len(cases) + 1
    since = watcher.mark()
    watcher.publish(a.topic("cmd/set"), _signed({"id": "cleanup", "action": "unpin",
                                                  "knob": "max_batch_size"}))
    assert _result(watcher, a, "cleanup", since)["outcome"] == "ok"


def test_a_fleet_wide_pause_reaches_both_daemons(fleet):
    daemons, watcher, _ = fleet
    a, b = daemons["a"], daemons["b"]
    # B has no secret: it ignores ts and hmac; A requires them. One signed command serves both.
    for action, paused in (("pause", True), ("resume", False)):
        since = watcher.mark()
        watcher.publish(f"{PREFIX}/all/cmd/set", _signed({"id": f"fleet-{action}", "action": action}))
        for d in (a, b):
            reply = _result(watcher, d, f"fleet-{action}", since)
            assert reply["outcome"] == "ok" and reply["node"] == d.node, reply
            assert d.get("/v1/control/status")["paused"] is paused
            knobs = watcher.wait(d.topic("knobs"), lambda p, v=paused: json.loads(p)["paused"] is v, since)
            assert json.loads(knobs)["node"] == d.node
    # A policy switch by preset name, fleet-wide: the same path as PUT /v1/control/policy.
    since = watcher.mark()
    watcher.publish(f"{PREFIX}/all/cmd/set", _signed({"id": "fleet-policy", "action": "set_policy",
                                                      "name": "observe-only"}))
    for d in (a, b):
        reply = _result(watcher, d, "fleet-policy", since)
        assert reply["outcome"] == "ok" and reply["result"]["name"] == "observe-only", reply
        assert d.get("/v1/control/status")["policy"] == "observe-only"
        watcher.wait(d.topic("knobs"), lambda p: json.loads(p)["policy"] == "observe-only", since)
    # Unsigned is fine for B, not for A.
    since = watcher.mark()
    watcher.publish(f"{PREFIX}/all/cmd/set", json.dumps({"id": "unsigned", "action": "pause"}).encode())
    assert _result(watcher, b, "unsigned", since)["outcome"] == "ok"
    assert _result(watcher, a, "unsigned", since)["outcome"] == "refused"
    assert b.get("/v1/control/status")["paused"] is True and a.get("/v1/control/status")["paused"] is False
    watcher.publish(b.topic("cmd/set"), json.dumps({"id": "unsigned-resume", "action": "resume"}).encode())
    assert _result(watcher, b, "unsigned-resume", since)["outcome"] == "ok"


def test_the_daemon_reconnects_and_republishes_after_a_broker_restart(fleet):
    daemons, _, private = fleet
    c = daemons["c"]
    watcher = Watcher(private.port)
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def keep_serving():
        nonlocal served
        body = json.dumps({"model": "demo", "prompt": "def", "max_tokens": 2}).encode()
        while not stop.is_set():
            try:
                with urllib.request.urlopen(c.base + "/health", timeout=30) as r:
                    assert r.status == 200
                req = urllib.request.Request(c.base + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
                served += 1
            except (AssertionError, OSError, urllib.error.URLError) as e:
                failures.append(repr(e))
            stop.wait(0.2)

    def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    def connected() -> float:
        return _metric(c.metrics(), f'optd_mqtt_connected{{node="{c.node}"}}')

    try:
        watcher.wait(c.topic("status"), lambda p: p == b"online")
        client = threading.Thread(target=keep_serving)
        client.start()
        until(lambda: served >= 1, "no request served")
        private.stop()
        until(lambda: connected() == 0, "the bridge never noticed the broker going away")
        # The bridge retries in the background; requests are served meanwhile.
        down = served
        until(lambda: served >= down + 2, "requests stopped while the broker was away")
        since = watcher.mark()
        private.start()     # a fresh broker: no retained state survives, so whatever arrives is republished
        assert watcher.wait(c.topic("status"), lambda p: p == b"online", since)
        knobs = json.loads(watcher.wait(c.topic("knobs"), since=since))
        assert knobs["node"] == c.node
        watcher.wait(c.topic("telemetry"), since=since)
        until(lambda: connected() == 1, "the bridge does not say it is connected")
        stop.set()
        client.join(WAIT_S)
        assert failures == []
    finally:
        stop.set()
        watcher.close()


def test_sigkill_turns_the_retained_status_offline_through_the_last_will(fleet):
    daemons, watcher, _ = fleet
    b = daemons["b"]
    watcher.wait(b.topic("status"), lambda p: p == b"online")
    since = watcher.mark()
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(timeout=WAIT_S)
    assert watcher.wait(b.topic("status"), lambda p: p == b"offline", since) == b"offline"


def test_a_clean_stop_publishes_offline(fleet):
    daemons, watcher, _ = fleet
    a = daemons["a"]
    since = watcher.mark()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=WAIT_S) == 0
    assert watcher.wait(a.topic("status"), lambda p: p == b"offline", since) == b"offline"
