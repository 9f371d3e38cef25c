"""The fleet view (`optd top --mqtt`) against two real daemons on a real broker.

Two `optd serve --mqtt ... --policy balanced` processes (demo model, free ports, state directories of
their own) publish under a topic prefix unique to this run, with commands on: A requires HMAC-signed
commands, B takes any. The broker is Mosquitto at 127.0.0.1:1883 when it answers, else an in-process amqtt
broker (tests.daemon.test_mqtt's fixture). Retained topics are cleared at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from textual.widgets import Input

from optd.daemon.mqtt import http_url
from optd.daemon.mqtt_commands import Authenticator
from optd.daemon.mqtt_commands import sign as daemon_sign
from optd.tui.fleet.app import Drill, FleetApp
from optd.tui.fleet.broker import check_prefix, parse_broker
from optd.tui.fleet.commands import FleetCommand, encode, sign
from optd.tui.fleet.confirm import ConfirmScreen
from optd.tui.fleet.detail import NodeDetailScreen
from optd.tui.fleet.link import FleetLink, NotConnected
from optd.tui.fleet.main import HMAC_ENV, hmac_secret
from optd.tui.fleet.policy import FleetPolicyScreen
from optd.tui.fleet.state import FleetState
from tests.daemon.test_mqtt import Watcher, _private_broker, broker_port  # noqa: F401 (the broker fixture)
from tests.daemon.test_serve_lifecycle import Daemon, kill, start
from tests.tui.conftest import until
from tests.tui.test_tmux import Tmux

RUN = uuid.uuid4().hex[:8]
PREFIX = f"optdtest/fleet-{RUN}"
SECRET = f"fleet-secret-{RUN}"
A, B = f"a-{RUN}", f"b-{RUN}"
SIZE = (140, 30)


# -- the parts, without a broker ----------------------------------------------------------------------

def test_fleet_commands_are_signed_as_the_daemon_verifies():
    command = FleetCommand(action="set_policy", name="balancé")      # non-ASCII: canonical JSON keeps it
    body = json.loads(encode(command, SECRET, now=1_700_000_000.25))
    assert body["hmac"] == daemon_sign(body, SECRET) == sign(body, SECRET)
    Authenticator(SECRET, 30.0, clock=lambda: 1_700_000_010.0).check(body)       # does not raise
    assert set(json.loads(encode(command))) == {"id", "action", "name"}          # unsigned: no ts, hmac
    assert json.loads(encode(FleetCommand(action="pause"))).keys() == {"id", "action"}


def test_state_reads_the_bridges_topics_and_survives_bad_messages():
    state = FleetState("mqtt://x:1883", "p/v1")
    state.receive("p/v1/n1/status", b"online", 10.0)
    knobs = {"node": "n1", "model": "demo", "url": "http://10.0.0.1:8000", "paused": True,
             "knobs": {"spec_length": 2, "max_batch_size": 8}, "pins": {"spec_length": {"value": 2}},
             "policy": "balanced", "mode": "enforce", "new_field": 1}
    state.receive("p/v1/n1/knobs", json.dumps(knobs).encode(), 11.0)
    state.receive("p/v1/n1/telemetry", json.dumps({"ts": 5.0, "tokens_per_s": 3.5,
                                                   "max_batch_size": 6.0}).encode(), 12.0)
    node = state.nodes["n1"]
    assert node.online and node.url == "http://10.0.0.1:8000" and node.knobs.paused
    assert node.knob("max_batch_size") == 6 and node.knob("spec_length") == 2 and node.seen_at == 12.0
    for topic, payload in (("p/v1/n1/telemetry", b"{"), ("p/v1/n1/knobs", b'{"knobs": 3}'),
                           ("p/v1/n1/status", b"maybe")):
        state.receive(topic, payload, 13.0)
    assert state.bad_messages == 3 and "status must be online or offline" in state.last_problem
    assert state.nodes["n1"].knobs.paused                     # what was read before stands
    state.receive("p/v1/all/cmd/set", b"{}", 14.0)             # not a node
    state.receive("other/n2/status", b"online", 14.0)          # not this prefix
    assert list(state.nodes) == ["n1"]
    # replies: ours are matched by id, others' ignored
    sent = state.sent(FleetCommand(action="pause"), 20.0)
    assert sent.expected == ["n1"] and sent.waiting(21.0)
    state.receive("p/v1/n1/cmd/result", json.dumps({"id": "someone-else", "node": "n1",
                                                    "outcome": "ok"}).encode(), 21.0)
    state.receive("p/v1/n1/cmd/result", json.dumps({"id": sent.command.id, "node": "n1", "outcome": "refused",
                                                    "reason": "hmac: missing"}).encode(), 21.0)
    assert sent.results["n1"].reason == "hmac: missing" and sent.pending() == []
    # clearing the retained topics (and no telemetry) forgets the node
    state.receive("p/v1/n2/status", b"offline", 22.0)
    state.receive("p/v1/n2/status", b"", 23.0)
    assert "n2" not in state.nodes


def test_bad_broker_url_prefix_and_secret_exit_2(capsys):
    from optd.daemon.cli import main

    for args, message in ((["--mqtt", "http://x"], "--mqtt: expected mqtt://HOST"),
                          (["--mqtt", "mqtt://x:99999"], "--mqtt: invalid port"),
                          (["--mqtt", "mqtt://x", "--prefix", "a/+/b"], "--prefix: topic levels"),
                          (["--mqtt", "mqtt://x", "--hmac-secret", " "], "--hmac-secret: the secret is"),
                          (["--mqtt", "mqtt://x", "--url", "http://y:1"], "--url and --mqtt: give one")):
        assert main(["top", *args, "--token", "t"]) == 2
        assert message in capsys.readouterr().err
    assert parse_broker("mqtts://u:p%40ss@h").password == "p@ss" and parse_broker("mqtts://h").port == 8883
    assert check_prefix("optd/v1") == "optd/v1"
    assert hmac_secret(None, {HMAC_ENV: "from-env"}) == "from-env" and hmac_secret("given", {}) == "given"
    assert hmac_secret(None, {}) is None


def test_the_url_a_node_announces():
    assert http_url("127.0.0.1", 8000) == "http://127.0.0.1:8000" and http_url("::1", 80) == "http://[::1]:80"
    assert http_url("0.0.0.0", 8000) == f"http://{socket.gethostname()}:8000"    # a wildcard names no host


def test_the_broker_away_shows_and_its_return_recovers():
    broker = _private_broker()                # not started yet: nothing listens on its port

    async def main() -> None:
        address = parse_broker(f"mqtt://127.0.0.1:{broker.port}")
        link = FleetLink(address, PREFIX, FleetState(address.label, PREFIX))
        app = FleetApp(link, tick_s=0.1)
        try:
            async with app.run_test(size=(100, 20), notifications=True) as pilot:
                await until(pilot, lambda: app.state.connection == "disconnected", "the disconnected state")
                # The redraw, not a fixed pause (under load it can take longer than 0.3 s).
                await until(pilot, lambda: "retrying in" in app.export_text(), "the retry countdown")
                screen = app.export_text()
                assert "BROKER UNREACHABLE" in screen.splitlines()[0] and "retrying in" in screen
                await pilot.press("p", "enter")            # a command now fails, saying why
                await until(pilot, lambda: "not connected to the broker" in app.export_text(), "the toast")
                with pytest.raises(NotConnected):
                    await link.send(FleetCommand(action="resume"))
                await asyncio.to_thread(broker.start)
                await until(pilot, lambda: app.state.live, "the reconnect", timeout=30)
                await until(pilot, lambda: "● live" in app.export_text().splitlines()[0], "the live header")
        finally:
            await link.stop()

    try:
        asyncio.run(main())
    finally:
        with contextlib.suppress(Exception):
            broker.stop()


# -- two real daemons ---------------------------------------------------------------------------------

def _launch(tmp: Path, name: str, port: int, mqtt: dict) -> Daemon:
    state = tmp / name
    state.mkdir()
    config = state / "optd.yaml"
    config.write_text(json.dumps({"mqtt": {"node": name, "topic_prefix": PREFIX, "commands": True,
                                           "reconnect_max_s": 1.0, **mqtt}}))       # JSON is YAML
    return start(state, "--config", str(config), "--mqtt", f"mqtt://127.0.0.1:{port}", "--policy", "balanced")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, broker_port):  # noqa: F811 (the imported fixture)
    tmp = tmp_path_factory.mktemp("fleet")
    # both load their models at once: the slow part, shared by every test here
    with ThreadPoolExecutor(2) as pool:
        futures = {A: pool.submit(_launch, tmp, A, broker_port, {"hmac_secret": SECRET}),
                   B: pool.submit(_launch, tmp, B, broker_port, {})}
    daemons: dict[str, Daemon] = {}
    try:
        for name, future in futures.items():
            daemons[name] = future.result()
        yield daemons, broker_port
        for d in daemons.values():
            assert d.stop() == 0
    finally:
        for future in futures.values():
            with contextlib.suppress(Exception):
                kill(future.result())
        watcher = Watcher(broker_port)                       # leave no retained state on a shared broker
        for name in (A, B):
            for leaf in ("status", "knobs"):
                watcher.publish(f"{PREFIX}/{name}/{leaf}", b"", retain=True)
        watcher.close()


def status(daemon: Daemon) -> dict:
    return daemon.get("/v1/control/status")


def drive(port: int, body, secret: str | None = SECRET) -> FleetApp:
    """Run the fleet view until both nodes are on it with knobs and a sample, then `body(app, pilot)`."""
    async def main() -> FleetApp:
        broker = parse_broker(f"mqtt://127.0.0.1:{port}")
        link = FleetLink(broker, PREFIX, FleetState(broker.label, PREFIX), hmac_secret=secret)
        app = FleetApp(link, tick_s=0.25)
        try:
            async with app.run_test(size=SIZE, notifications=True) as pilot:
                def both() -> bool:
                    ready = [n for n in app.state.nodes.values() if n.online and n.url and n.sample]
                    return sorted(n.name for n in ready) == [A, B]
                await until(pilot, both, "both nodes with their knobs and telemetry", timeout=60)
                await pilot.pause(0.3)
                await body(app, pilot)
        finally:
            await link.stop()
        return app
    return asyncio.run(main())


def line(app: FleetApp, node: str) -> str:
    return next(row for row in app.export_text().splitlines() if node in row)


def test_two_daemons_appear_as_two_nodes_and_open(nodes):
    daemons, port = nodes

    async def body(app: FleetApp, pilot) -> None:
        assert app.table.row_count == 2                      # this run's prefix: these two only
        for name, daemon in daemons.items():
            row = line(app, name)
            assert "online" in row and "demo" in row and "balanced" in row, row
            assert app.state.nodes[name].url == daemon.base        # announced in the retained `knobs`
        assert "2 nodes: 2 online" in app.export_text().splitlines()[0]
        # the detail view, from MQTT: knobs, telemetry, where its HTTP API is
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, NodeDetailScreen), "the detail view")
        await pilot.pause(0.3)
        screen = app.export_text()
        assert f" {A} " in screen and f"HTTP API: {daemons[A].base}" in screen
        assert "max_batch_size" in screen and "telemetry (" in screen and "tokens/s" in screen
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, NodeDetailScreen), "the fleet again")
        await pilot.press("down", "enter")                  # B: its own dashboard, over HTTP
    app = drive(port, body)
    assert app.return_value == Drill(B, daemons[B].base)


def test_fleet_wide_pause_and_resume_reach_both_nodes(nodes):
    daemons, port = nodes

    async def body(app: FleetApp, pilot) -> None:
        await pilot.press("p", "escape")                     # asked, then cancelled: nothing sent
        await pilot.pause(0.2)
        assert app.state.commands == [] and not any(status(d)["paused"] for d in daemons.values())
        for key, paused in (("p", True), ("r", False)):
            await pilot.press(key)
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            question = app.screen.question                  # what the modal shows, unwrapped
            assert "2 online now" in question and "signed with the HMAC secret" in question
            assert f"Published to {PREFIX}/all/cmd/set" in question and "Confirm" in app.export_text()
            await pilot.press("enter")                       # Confirm has the focus

            async def reached(p=paused) -> bool:
                answers = await asyncio.gather(*(asyncio.to_thread(status, d) for d in daemons.values()))
                return all(a["paused"] is p for a in answers)
            await until(pilot, reached, f"{'pause' if paused else 'resume'} to reach both daemons")
            sent = app.state.commands[0]
            await until(pilot, lambda s=sent: sorted(s.results) == [A, B], "both answers")
            assert all(r.outcome == "ok" for r in sent.results.values())
            await until(pilot, lambda p=paused: all(n.knobs.paused is p for n in app.state.nodes.values()),
                        "the retained knobs to follow")
            # Wait for the redraw rather than a fixed pause: under load it can take longer than 0.3 s.
            expected = f"pause → ok: {A}, {B}" if paused else f"resume → ok: {A}, {B}"
            await until(pilot, lambda e=expected: e in app.export_text(), "the results line")
            assert ("PAUSED" in line(app, A) and "PAUSED" in line(app, B)) is paused
    drive(port, body)


def test_policy_switch_unsigned_is_refused_by_the_node_that_wants_a_signature(nodes):
    daemons, port = nodes

    async def switch(app: FleetApp, pilot, name: str) -> None:
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, FleetPolicyScreen), "the policy picker")
        assert "balanced  (running on 2 nodes)" in app.export_text() or name == "balanced"
        app.screen.query_one("#other", Input).value = name          # (typed out, it is just slower)
        app.screen.query_one("#other", Input).focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert "unsigned (nodes with mqtt.hmac_secret set will refuse it" in app.screen.question
        await pilot.press("enter")

    async def body(app: FleetApp, pilot) -> None:
        await switch(app, pilot, "observe-only")
        await until(pilot, lambda: len(app.state.commands[0].results) == 2, "both answers")
        results = app.state.commands[0].results
        assert results[B].outcome == "ok" and results[B].result["name"] == "observe-only"
        assert results[A].outcome == "refused" and results[A].reason.startswith("hmac: missing")
        assert status(daemons[B])["policy"] == "observe-only" and status(daemons[A])["policy"] == "balanced"
        await pilot.pause(0.3)
        assert f"{A} refused: hmac: missing" in app.export_text()
        await until(pilot, lambda: "observe" in line(app, B), "B's row to show the new policy")
        await switch(app, pilot, "balanced")                  # back as it was
        await until(pilot, lambda: len(app.state.commands[0].results) == 2, "both answers")
        assert status(daemons[B])["policy"] == "balanced"
    drive(port, body, secret=None)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_optd_top_mqtt_opens_a_node_and_comes_back_in_tmux(nodes):
    daemons, port = nodes
    tmux = Tmux()
    state_dir = daemons[A].state                     # its control.token: the one `top` finds
    command = (f"{sys.executable} -m optd.daemon.cli top --mqtt mqtt://127.0.0.1:{port} --prefix {PREFIX} "
               f"--state-dir {state_dir}; echo optd-top-exited-$?; sleep 30")
    started = tmux("new-session", "-d", "-s", "top", "-x", "140", "-y", "30", "-e", "TERM=xterm-256color",
                   command)
    assert started.returncode == 0, started.stderr
    try:
        tmux.wait_for(lambda s: A in s and B in s and s.count("online") >= 2, "both nodes")
        tmux("send-keys", "-t", "top", "Enter")               # A, the first row: its own dashboard
        host = daemons[A].base.removeprefix("http://")
        screen = tmux.wait_for(lambda s: "● live" in s and host in s.splitlines()[0], "A's dashboard")
        assert "spec_length" in screen and "p pause/resume" in screen
        time.sleep(0.5)
        tmux("send-keys", "-t", "top", "q")                   # back to the fleet, not out
        tmux.wait_for(lambda s: "optd fleet" in s and B in s, "the fleet view again")
        tmux("send-keys", "-t", "top", "q")
        tmux.wait_for(lambda s: "optd-top-exited-0" in s, "optd top to exit 0")
    finally:
        tmux("kill-server")
