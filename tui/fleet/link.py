"""The fleet view's MQTT connection (aiomqtt): subscribe to every node's topics under the prefix, feed the
messages into a FleetState, publish fleet commands; when the broker goes away, say so and try again with
exponential backoff. Runs as a task on the app's event loop; every wait is an await, so the screen never
freezes. It outlives one app: `optd top --mqtt` keeps it while a node's own dashboard is open, so the
fleet is up to date when the operator comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import aiomqtt

from optd.tui.feed import Backoff
from optd.tui.fleet.broker import Broker
from optd.tui.fleet.commands import FleetCommand, encode
from optd.tui.fleet.messages import FLEET_LEVEL, SUBSCRIBED
from optd.tui.fleet.state import FleetState, SentCommand

KEEPALIVE_S = 30
TIMEOUT_S = 10.0


class NotConnected(Exception):
    """A command could not be published: the broker is not connected (the message says why)."""


class FleetLink:
    def __init__(self, broker: Broker, prefix: str, state: FleetState, *, hmac_secret: str | None = None,
                 clock: Callable[[], float] = time.time, backoff: Backoff | None = None) -> None:
        self.broker, self.prefix, self.state, self.clock = broker, prefix, state, clock
        self.hmac_secret = hmac_secret
        self.backoff = backoff or Backoff()
        self.identifier = f"optd-top-{uuid.uuid4().hex[:8]}"       # unique: two viewers must not collide
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task | None = None

    # -- life --

    def start(self) -> None:
        """Connect (and keep reconnecting) on the running loop; a second call while running does nothing."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="optd-top-mqtt")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        while True:
            try:
                async with self._make_client() as client:
                    for leaf, qos in SUBSCRIBED.items():
                        await client.subscribe(f"{self.prefix}/+/{leaf}", qos=qos, timeout=TIMEOUT_S)
                    self._client = client
                    self.state.connected()
                    self.backoff.reset()
                    async for message in client.messages:
                        self.state.receive(message.topic.value, _payload(message.payload), self.clock())
                raise aiomqtt.MqttError("the broker closed the connection")
            except Exception as e:         # MqttError mostly; whatever it is, say so and try again
                self._client = None
                delay = self.backoff.next()
                problem = str(e) if isinstance(e, aiomqtt.MqttError) else f"{type(e).__name__}: {e}"
                self.state.disconnected(f"{self.broker.label}: {problem}", self.clock() + delay)
                await asyncio.sleep(delay)

    def _make_client(self) -> aiomqtt.Client:
        b = self.broker
        return aiomqtt.Client(b.host, b.port, username=b.username, password=b.password,
                              identifier=self.identifier, keepalive=KEEPALIVE_S, timeout=TIMEOUT_S,
                              tls_context=b.tls_context())

    # -- commands --

    @property
    def fleet_topic(self) -> str:
        return f"{self.prefix}/{FLEET_LEVEL}/cmd/set"

    async def send(self, command: FleetCommand) -> SentCommand:
        """Publish `command` fleet-wide (QoS 1, never retained: a retained command would run again at
        every node's reconnect, and the daemon refuses one); the replies land in the returned record."""
        client = self._client
        if client is None or not self.state.live:
            raise NotConnected(f"not connected to the broker {self.broker.label}"
                               + (f": {self.state.problem}" if self.state.problem else ""))
        now = self.clock()
        record = self.state.sent(command, now)          # first: a fast reply must find it
        try:
            await client.publish(self.fleet_topic, encode(command, self.hmac_secret, now), qos=1,
                                 timeout=TIMEOUT_S)
        except aiomqtt.MqttError as e:
            self.state.commands.remove(record)
            raise NotConnected(f"could not publish to {self.broker.label}: {e}") from None
        return record


def _payload(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()
