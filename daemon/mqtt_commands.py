"""Commands over MQTT: parse, authenticate and run them through the control API's own code paths.

Off unless `mqtt.commands: true`. The bridge subscribes `<prefix>/<node>/cmd/set` and the fleet-wide
`<prefix>/all/cmd/set` (QoS 1) and answers every command on `<prefix>/<node>/cmd/result` (QoS 1):

    {"id": <the command's id>, "node": "<node>", "action": "pin", "outcome": "ok" | "refused",
     "reason": null | "<why it was refused>", "result": <the action's result, as the HTTP API returns it>}

A command is one JSON object (UTF-8, at most 64 KiB) with an `id` (string or integer) and an `action`:

    {"id": "c1", "action": "pin", "knob": "max_batch_size", "value": 8, "ttl_s": 600, "reason": "..."}
    {"id": "c2", "action": "unpin", "knob": "max_batch_size"}
    {"id": "c3", "action": "pause"}              {"id": "c4", "action": "resume"}
    {"id": "c5", "action": "set_policy", "name": "balanced"}        (a preset or search-path name)

`pin` and `unpin` are `PUT`/`DELETE /v1/control/knobs/{name}`, `pause`/`resume` are `POST pause|resume`,
`set_policy` is `PUT /v1/control/policy {"name": ...}`: the same ControlRoutes methods run them (decisions
are recorded with source "mqtt"). Unknown fields, a missing field, a value of the wrong type, an unknown
action or knob, a value the engine rejects: refused with a reason naming the field, and nothing changes.
A command the broker delivers as retained (one published with retain=true, which the broker then hands
to every new subscription) is refused: it would run again at every reconnect.

Signed commands. With `mqtt.hmac_secret` set, every command must also carry
- `ts`: the sender's clock, seconds since the Unix epoch (a number), within `mqtt.hmac_window_s` of ours;
- `hmac`: the lowercase hex HMAC-SHA256, keyed with the secret's UTF-8 bytes, of the command's canonical
  JSON without the `hmac` field: keys sorted, no whitespace (separators "," and ":"), non-ASCII
  characters as themselves, UTF-8 encoded. In Python:

      body = {"id": "c3", "action": "pause", "ts": time.time()}
      canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
      body["hmac"] = hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()

  (The daemon re-serializes the object it parsed, so numbers are compared as Python writes them: send
  `ts` as an integer or a float that round-trips, as any JSON encoder's shortest form does.)
A command without them, with a wrong one, outside the window, or repeating an already accepted `hmac`
within the window (a replay) is refused and counted. Without a secret, `ts` and `hmac` are ignored.
Authentication is checked before anything else about the command, so an unsigned sender learns nothing
but that.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from optd.daemon.control_api import ActionRefused, ControlRoutes, PinRequest
from optd.daemon.events import jsonable

log = logging.getLogger(__name__)

ACTIONS = ("pin", "unpin", "pause", "resume", "set_policy")
MAX_COMMAND_BYTES = 64 * 1024
SOURCE = "mqtt"         # decisions and pins made by a command carry this source


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | StrictInt
    ts: float | None = Field(default=None, allow_inf_nan=False)
    hmac: str | None = None


class Pin(_Command):
    action: Literal["pin"]
    knob: StrictStr
    value: Any = Field(...)
    ttl_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    reason: str = Field(default="", max_length=1000)


class Unpin(_Command):
    action: Literal["unpin"]
    knob: StrictStr


class Pause(_Command):
    action: Literal["pause"]


class Resume(_Command):
    action: Literal["resume"]


class SetPolicy(_Command):
    action: Literal["set_policy"]
    name: StrictStr = Field(min_length=1, max_length=128)


Command = Annotated[Pin | Unpin | Pause | Resume | SetPolicy, Field(discriminator="action")]
_COMMAND = TypeAdapter(Command)


class Refused(Exception):
    """A command not run; str(e) is the reason sent back."""


def canonical(body: dict[str, Any]) -> bytes:
    """What the HMAC is computed over: `body` without `hmac`, as canonical JSON (module docstring)."""
    unsigned = {k: v for k, v in body.items() if k != "hmac"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(body: dict[str, Any], secret: str) -> str:
    """The `hmac` field for `body` (for senders and tests; the daemon checks with `Authenticator`)."""
    return hmac.new(secret.encode(), canonical(body), hashlib.sha256).hexdigest()


class Authenticator:
    """HMAC-SHA256 + timestamp window + replay check (module docstring)."""

    def __init__(self, secret: str, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self._key, self.window_s, self._clock = secret.encode(), window_s, clock
        self._seen: dict[str, float] = {}      # accepted hmac -> when it may be forgotten

    def check(self, body: dict[str, Any]) -> None:
        given, ts = body.get("hmac"), body.get("ts")
        if given is None:
            raise Refused("hmac: missing (this node obeys only signed commands: add ts and hmac)")
        if ts is None:
            raise Refused("ts: missing (signed commands carry their time, seconds since the epoch)")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            raise Refused(f"ts: must be a number of seconds since the epoch, got {ts!r}")
        now = self._clock()
        if abs(now - ts) > self.window_s:
            raise Refused(f"ts: {now - ts:+.0f}s from this node's clock, outside the {self.window_s:g}s "
                          "window (stale, or clocks apart)")
        expected = hmac.new(self._key, canonical(body), hashlib.sha256).hexdigest()
        if not isinstance(given, str) or not hmac.compare_digest(given.lower().encode(), expected.encode()):
            raise Refused("hmac: does not match (HMAC-SHA256 of the canonical JSON without hmac, "
                          "keyed with mqtt.hmac_secret)")
        self._seen = {h: t for h, t in self._seen.items() if t > now}
        if expected in self._seen:
            raise Refused("replayed: a command with this hmac was already accepted")
        # Forget it once its ts can no longer pass the window check.
        self._seen[expected] = ts + self.window_s + 1.0


def _describe(err: ValidationError, action: str) -> str:
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] == action:         # the discriminated union puts the tag first
            loc = loc[1:]
        field = ".".join(loc) or "command"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{field}: {msg}")
    return "; ".join(parts)


class CommandHandler:
    """Turns one command payload into its reply, running the action through ControlRoutes."""

    def __init__(self, control: ControlRoutes, node: str, *, hmac_secret: str | None = None,
                 hmac_window_s: float = 30.0, metrics=None, clock: Callable[[], float] = time.time) -> None:
        self.control, self.node, self.metrics = control, node, metrics
        self.auth = Authenticator(hmac_secret, hmac_window_s, clock) if hmac_secret else None
        self.ok = self.refused = 0

    def parse(self, payload: bytes, retained: bool = False) -> Command:
        """The command in `payload`, authenticated and validated; raises Refused."""
        if retained:
            raise Refused("retained commands are not obeyed (publish cmd/set with retain=false)")
        if len(payload) > MAX_COMMAND_BYTES:
            raise Refused(f"command of {len(payload)} bytes, larger than {MAX_COMMAND_BYTES}")
        try:
            body = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise Refused("not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise Refused(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(body, dict):
            raise Refused(f"a command must be a JSON object, got {type(body).__name__}")
        if self.auth is not None:
            self.auth.check(body)
        action = body.get("action")
        if action not in ACTIONS:
            what = "missing" if action is None else f"unknown {action!r}"
            raise Refused(f"action: {what} (one of {', '.join(ACTIONS)})")
        try:
            return _COMMAND.validate_python(body)
        except ValidationError as e:
            raise Refused(_describe(e, action)) from None

    async def handle(self, payload: bytes, retained: bool = False) -> dict[str, Any]:
        """Run the command in `payload`; return the reply (module docstring). Never raises for a bad
        command: it is refused, with a reason, and nothing changes."""
        cmd_id, action = _peek(payload)
        try:
            cmd = self.parse(payload, retained)
            result = await self._run(cmd)
        except (Refused, ActionRefused) as e:
            self._count("refused")
            log.warning("MQTT command %r (%s) refused: %s", cmd_id, action, e)
            return self._reply(cmd_id, action, "refused", str(e), None)
        except Exception as e:                  # a fault in the action itself; the daemon keeps serving
            self._count("refused")
            log.exception("MQTT command %r (%s) failed", cmd_id, action)
            return self._reply(cmd_id, action, "refused", f"failed: {type(e).__name__}: {e}", None)
        self._count("ok")
        log.info("MQTT command %r: %s done", cmd.id, cmd.action)
        return self._reply(cmd.id, cmd.action, "ok", None, result)

    def refuse(self, payload: bytes, reason: str) -> dict[str, Any]:
        """The reply refusing `payload` unread (e.g. when too many commands are pending), counted."""
        cmd_id, action = _peek(payload)
        self._count("refused")
        log.warning("MQTT command %r (%s) refused: %s", cmd_id, action, reason)
        return self._reply(cmd_id, action, "refused", reason, None)

    async def _run(self, cmd: Command) -> dict[str, Any]:
        c = self.control
        match cmd:
            case Pin():
                req = PinRequest(value=cmd.value, ttl_s=cmd.ttl_s, reason=cmd.reason)
                return await c.pin_knob(cmd.knob, req, source=SOURCE)
            case Unpin():
                return await c.unpin_knob(cmd.knob, source=SOURCE)
            case Pause() | Resume():
                return await c.set_paused(isinstance(cmd, Pause))
            case SetPolicy():
                return await c.set_policy(cmd.name)
        raise AssertionError(f"unhandled command {cmd!r}")

    def _reply(self, cmd_id: Any, action: Any, outcome: str, reason: str | None,
               result: Any) -> dict[str, Any]:
        return jsonable({"id": cmd_id, "node": self.node, "action": action, "outcome": outcome,
                         "reason": reason, "result": result})

    def _count(self, outcome: str) -> None:
        if outcome == "ok":
            self.ok += 1
        else:
            self.refused += 1
        if self.metrics is not None:
            self.metrics.mqtt_commands.labels(outcome=outcome).inc()


def _peek(payload: bytes) -> tuple[Any, Any]:
    """The id and action to put in the reply, even for a command refused before it was validated."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None, None
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None
    if not isinstance(body, dict):
        return None, None
    cmd_id, action = body.get("id"), body.get("action")
    ok_id = isinstance(cmd_id, str | int) and not isinstance(cmd_id, bool)
    return (cmd_id if ok_id else None), (action if isinstance(action, str) else None)


async def run_worker(handler: CommandHandler, inbox: asyncio.Queue[tuple[bytes, bool]],
                     reply: Callable[[dict[str, Any]], None]) -> None:
    """Run the commands queued by the bridge's listener one at a time, in arrival order, independent of
    the connection (a command whose connection dropped still runs, and its reply goes out after the
    reconnect)."""
    while True:
        payload, retained = await inbox.get()
        reply(await handler.handle(payload, retained))
