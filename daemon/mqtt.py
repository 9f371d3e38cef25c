"""The MQTT bridge: this node's state, telemetry and decisions out to a broker; commands in.

Enabled by `optd serve --mqtt mqtt://HOST:PORT` or `mqtt.url` in the config (optd.daemon.config's
MqttSection: TLS, credentials, client id, topic prefix, commands, HMAC secret, queue size). aiomqtt 2.x.
Topics, under `<prefix>/<node>/` (prefix `optd/v1`, node the host name, by default):

- `status`     retained, QoS 1: `online` once connected; `offline` when the daemon stops cleanly, and
               the same `offline` as the connection's Last Will, so the broker says it for a daemon
               that died or lost its network.
- `telemetry`  QoS 0: one telemetry sample (DESIGN.md's flat sample, JSON) a message, as sampled.
- `decisions`  QoS 1: every decision, as the control API's event stream carries it (JSON: ts, knob,
               old_value, new_value, outcome, reason, cost_s, policy, mode, source, inputs): the policy's
               ("decision") and the operators' pins and unpins ("override").
- `knobs`      retained, QoS 1: {"ts", "node", "model", "url", "knobs": {the four}, "pins": {...},
               "paused", "policy", "mode"} (GET /v1/control/status's fields; `url` the node's HTTP API,
               null until it listens: where a fleet dashboard opens the node); republished when it
               changes, and after every (re)connect.
- `cmd/set`, and the fleet-wide `<prefix>/all/cmd/set`: commands, when enabled; replies on `cmd/result`
  (optd.daemon.mqtt_commands).

Nothing here blocks the engine, the sampler or the HTTP server: producers put into a bounded outbox
(optd.daemon.mqtt_outbox) that drops the oldest telemetry first, and one publisher task drains it while
connected. A lost connection (or a broker that is not there at start) is retried with exponential
backoff, jittered, capped at `mqtt.reconnect_max_s`; the daemon serves meanwhile. Prometheus:
`optd_mqtt_messages_sent_total{kind}`, `optd_mqtt_messages_dropped_total{kind}`,
`optd_mqtt_commands_total{outcome}`, `optd_mqtt_connected{node}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import ssl
import time
from typing import Any

import aiomqtt

from optd.daemon.config import MqttSection, broker_address
from optd.daemon.control_api import ControlRoutes
from optd.daemon.events import EventHub, Subscription, jsonable
from optd.daemon.mqtt_commands import CommandHandler, run_worker
from optd.daemon.mqtt_outbox import TELEMETRY, Outbox, Outgoing

log = logging.getLogger(__name__)

ONLINE, OFFLINE = b"online", b"offline"
DECISION_EVENTS = frozenset({"decision", "override"})
KNOBS_CHECK_S = 5.0         # besides every event: catches a change that published none
BACKOFF_FIRST_S = 0.5
PUBLISH_TIMEOUT_S = 10.0
STOP_FLUSH_S = 2.0          # at a clean stop: time to send what is queued (not telemetry) and `offline`
MAX_PENDING_COMMANDS = 64


class Topics:
    def __init__(self, prefix: str, node: str) -> None:
        base = f"{prefix}/{node}"
        self.status, self.telemetry = f"{base}/status", f"{base}/telemetry"
        self.decisions, self.knobs = f"{base}/decisions", f"{base}/knobs"
        self.cmd_set, self.cmd_result = f"{base}/cmd/set", f"{base}/cmd/result"
        self.fleet_cmd_set = f"{prefix}/all/cmd/set"


def _json(data: Any) -> bytes:
    return json.dumps(jsonable(data), separators=(",", ":")).encode()


def http_url(host: str, port: int) -> str:
    """The base URL other machines reach the HTTP API at, for the `knobs` message: a wildcard bind
    address names no machine, so it becomes this host's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def backoff(attempt: int, cap: float) -> float:
    """Seconds before reconnect `attempt` (0-based): doubling from BACKOFF_FIRST_S up to `cap`, with
    "equal jitter" (half fixed, half random) so a fleet that lost its broker does not return in step."""
    ceiling = min(cap, BACKOFF_FIRST_S * 2 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class MqttBridge:
    def __init__(self, settings: MqttSection, control: ControlRoutes, hub: EventHub, *, model: str,
                 metrics=None) -> None:
        if settings.url is None:
            raise ValueError("mqtt.url is not set")
        self.settings, self.control, self.hub, self.model = settings, control, hub, model
        self.metrics = metrics
        self.node = settings.node
        scheme, host, port, *_ = broker_address(settings.url)
        self.broker = f"{scheme}://{host}:{port}"       # for logs: the URL may carry a password
        self.topics = Topics(settings.topic_prefix, settings.node)
        self.outbox = Outbox(settings.queue_size, on_drop=self._count_dropped)
        self.commands = None
        if settings.commands:
            secret = settings.hmac_secret.get_secret_value() if settings.hmac_secret else None
            self.commands = CommandHandler(control, settings.node, hmac_secret=secret,
                                           hmac_window_s=settings.hmac_window_s, metrics=metrics)
        self.connected = False
        self.http_url: str | None = None        # the HTTP API's base URL, once it listens (set_http_url)
        self.connections = 0                    # successful connects so far
        self._last_knobs: dict[str, Any] | None = None
        self._knobs_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inbox: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue(MAX_PENDING_COMMANDS)
        self._run_task: asyncio.Task | None = None
        self._helpers: list[asyncio.Task] = []
        if metrics is not None:                 # every series from the first scrape on
            for kind in (TELEMETRY, "decision", "knobs", "status", "result"):
                metrics.mqtt_sent.labels(kind=kind)
                metrics.mqtt_dropped.labels(kind=kind)
            for outcome in ("ok", "refused"):
                metrics.mqtt_commands.labels(outcome=outcome)
            metrics.mqtt_connected.labels(node=self.node).set(0)

    # -- producers (event loop; never block) --------------------------------------------------------

    def publish_sample(self, sample: dict[str, Any]) -> None:
        """A TelemetryJob subscriber."""
        self.outbox.put(Outgoing(TELEMETRY, self.topics.telemetry, _json(sample)))

    def _reply(self, reply: dict[str, Any]) -> None:
        self.outbox.put(Outgoing("result", self.topics.cmd_result, _json(reply), qos=1))

    async def _watch_events(self, sub: Subscription) -> None:
        async for kind, data in sub:
            if kind == "sample":
                continue
            if kind in DECISION_EVENTS:
                self.outbox.put(Outgoing("decision", self.topics.decisions, _json(data), qos=1))
            self._knobs_changed.set()       # a decision, pin, pause or policy switch may change `knobs`

    def set_http_url(self, url: str) -> None:
        """Where this node's HTTP API listens (known once the server is up, its port may be picked then):
        it goes into the retained `knobs` message."""
        self.http_url = url
        self._knobs_changed.set()

    def knobs_state(self) -> dict[str, Any]:
        """The `knobs` payload without its ts (blocking: the store; call it in a worker thread)."""
        status = self.control.status_view()
        return jsonable({"node": self.node, "model": self.model, "url": self.http_url,
                         **{k: status.get(k) for k in ("knobs", "pins", "paused", "policy", "mode")}})

    async def _watch_knobs(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._knobs_changed.wait(), KNOBS_CHECK_S)
            self._knobs_changed.clear()
            try:
                state = await asyncio.to_thread(self.knobs_state)
            except Exception as e:              # the store or engine is busy or closing: next time
                log.warning("MQTT: could not read the knobs state: %s", e)
                continue
            if state != self._last_knobs:
                self._last_knobs = state
                payload = _json({"ts": time.time(), **state})
                self.outbox.put(Outgoing("knobs", self.topics.knobs, payload, qos=1, retain=True))

    # -- the connection -----------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        scheme, host, port, url_user, url_password = broker_address(s.url or "")
        tls = None
        if scheme == "mqtts" or s.tls_ca_file is not None:
            tls = ssl.create_default_context(cafile=str(s.tls_ca_file) if s.tls_ca_file else None)
            if s.tls_insecure:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        password = s.password.get_secret_value() if s.password is not None else url_password
        return aiomqtt.Client(
            host, port, identifier=s.client_id or s.node, username=s.username or url_user, password=password,
            will=aiomqtt.Will(self.topics.status, OFFLINE, qos=1, retain=True), keepalive=s.keepalive_s,
            tls_context=tls, tls_insecure=s.tls_insecure if tls is not None else None,
            timeout=PUBLISH_TIMEOUT_S)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with self._client() as client:
                    attempt = 0
                    await self._connected(client)
                return                          # a clean stop
            except Exception as e:             # MqttError mostly; any other fault must not end the bridge
                if self._stopping.is_set():
                    return
                delay = backoff(attempt, self.settings.reconnect_max_s)
                attempt += 1
                if isinstance(e, aiomqtt.MqttError):
                    log.warning("MQTT broker %s: %s; retrying in %.1fs", self.broker, e, delay)
                else:
                    log.exception("MQTT bridge fault; reconnecting in %.1fs", delay)
            finally:
                self._set_connected(False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _connected(self, client: aiomqtt.Client) -> None:
        """One connection's life: announce, subscribe, publish until it fails (MqttError) or we stop."""
        self._set_connected(True)
        self.connections += 1
        await self._send(client, Outgoing("status", self.topics.status, ONLINE, qos=1, retain=True))
        self._last_knobs = None             # republish the state on every connect, changed or not
        self._knobs_changed.set()
        if self.commands is not None:
            await client.subscribe(self.topics.cmd_set, qos=1)
            await client.subscribe(self.topics.fleet_cmd_set, qos=1)
        log.info("MQTT: connected to %s as %s (topics %s/%s/...)", self.broker,
                 self.settings.client_id or self.node, self.settings.topic_prefix, self.node)
        tasks = [asyncio.create_task(self._pump(client)), asyncio.create_task(self._stopping.wait())]
        if self.commands is not None:
            tasks.append(asyncio.create_task(self._listen(client)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        if not self._stopping.is_set():     # the message stream ended without an error: reconnect anyway
            raise aiomqtt.MqttError("the connection ended")
        # Stopping: what is queued (not telemetry), then `offline` explicitly (a clean disconnect
        # does not fire the Last Will).
        with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
            async with asyncio.timeout(STOP_FLUSH_S):
                while (msg := self.outbox.get_nowait()) is not None:
                    if msg.kind == TELEMETRY:
                        self._count_dropped(msg)
                    else:
                        await self._send(client, msg)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self.topics.status, OFFLINE, qos=1, retain=True, timeout=STOP_FLUSH_S)
            self._count_sent("status")

    async def _pump(self, client: aiomqtt.Client) -> None:
        while True:
            msg = await self.outbox.get()
            try:
                await self._send(client, msg)
            except aiomqtt.MqttError:
                self.outbox.requeue(msg)
                raise

    async def _send(self, client: aiomqtt.Client, msg: Outgoing) -> None:
        await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain,
                             timeout=PUBLISH_TIMEOUT_S)
        self._count_sent(msg.kind)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                self._inbox.put_nowait((payload, bool(message.retain)))
            except asyncio.QueueFull:
                assert self.commands is not None
                why = f"too many commands pending ({MAX_PENDING_COMMANDS}); send it again later"
                self._reply(self.commands.refuse(payload, why))

    # -- life ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start on the running loop: connect (and keep reconnecting), publish, obey commands."""
        if self._run_task is not None:
            raise RuntimeError("MQTT bridge already started")
        events = self.hub.subscribe(self.settings.queue_size)
        self._helpers = [asyncio.create_task(self._watch_events(events)),
                         asyncio.create_task(self._watch_knobs())]
        if self.commands is not None:
            self._helpers.append(asyncio.create_task(run_worker(self.commands, self._inbox, self._reply)))
        self._run_task = asyncio.create_task(self._run())

    async def stop(self, timeout: float = 2 * STOP_FLUSH_S + 1) -> None:
        """Publish `offline` and disconnect cleanly (within `timeout` s); end the helper tasks."""
        self._stopping.set()
        if self._run_task is not None:
            try:
                await asyncio.wait_for(self._run_task, timeout)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("MQTT: no clean disconnect within %.0fs", timeout)
            except Exception:
                log.exception("MQTT bridge failed")
        for task in self._helpers:
            task.cancel()
        await asyncio.gather(*self._helpers, return_exceptions=True)

    # -- counting -----------------------------------------------------------------------------------

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        if self.metrics is not None:
            self.metrics.mqtt_connected.labels(node=self.node).set(1 if up else 0)

    def _count_sent(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.mqtt_sent.labels(kind=kind).inc()

    def _count_dropped(self, msg: Outgoing) -> None:
        if self.metrics is not None:
            self.metrics.mqtt_dropped.labels(kind=msg.kind).inc()
