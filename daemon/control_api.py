"""The control API under /v1/control/: status, knobs and pins, pause/resume, decisions, telemetry, events.

Auth: every write (PUT, DELETE, POST) needs `Authorization: Bearer <token>`; reads are open to loopback
clients and need the token from anywhere else. Errors use OpenAI's JSON error format.

Pins: `PUT knobs/{name}` applies the value through `engine.apply` and, when the engine applied it,
stores the pin (source "api"), records a decision and publishes an "override" event; a value the
engine rejects is a 400 with its reason and changes nothing. `DELETE knobs/{name}` (and a pin's TTL
running out, see `expire_pins`) puts the knob back at its baseline: the configured value, else the
value the engine had when these routes were built (its start value). Pins are in the store, so
`restore_pins()` re-applies them after a restart.

Ranges: `GET knobs` also carries `ranges`, per knob {"min", "max", "integer", "supported"} and, for a
knob this engine cannot turn, "reason": the engine's envelope (spec_length 0..max_spec_length with a
drafter, else 0..0; max_batch_size 1..max_num_seqs; the others their natural range, or only the value
they hold where the engine cannot turn them), what a pin may ask for; clients check a value against it
before sending (the engine checks again).

Requests: `GET requests` has the engine's running and waiting counts and the latest requests that did not
end ok (`recent_errors`, newest first, from the OpenAI routes' RequestLog; optd.daemon.request_log).

Policy: `GET policy` shows the running policy (name, source, mode, effective YAML, version id);
`PUT policy` with {"name": ...} (a preset or search-path name, or the configured policy's) or
{"yaml": ...} switches it through the policy job (optd.daemon.policy_job); an invalid policy is a
400 with its error and the running policy stays.

Blocking work (engine.apply waits for the engine thread's next step boundary; the store is SQLite)
runs in a worker thread, never on the event loop. One lock serializes every knob write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from optd.daemon.events import EventHub, jsonable, sse_message
from optd.daemon.models import OUTCOMES
from optd.daemon.openai_api import error, parse_body
from optd.engine import Engine, Knobs
from optd.engine.knobs import check_knob
from optd.policies.errors import PolicyError
from optd.policies.schema import KNOB_LIMITS

log = logging.getLogger(__name__)

MAX_DECISIONS = 1000
MAX_RECENT_ERRORS = 50
MAX_TELEMETRY_S = 86_400.0
KEEPALIVE_S = 15.0


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Any = Field(...)
    ttl_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    reason: str = ""


MAX_POLICY_CHARS = 256 * 1024


class PolicyRequest(BaseModel):
    """PUT policy: exactly one of `name` (never a path: see PolicyJob.load_named) or `yaml`."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=128)
    yaml: str | None = Field(default=None, min_length=1, max_length=MAX_POLICY_CHARS)


class _Failure(Exception):
    """An error response computed in a worker thread."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.response = error(status, message, param=param, kind=kind)


# What the action methods (pin_knob, unpin_knob, set_paused, set_policy) raise when they refuse; str(e) is
# the reason. Callers other than HTTP (the MQTT commands, optd.daemon.mqtt_commands) catch it by this name.
ActionRefused = _Failure


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else None
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _limit(query: Mapping[str, str], default: int, maximum: int) -> int | JSONResponse:
    """The `limit` query parameter in 1..maximum, or the 400 that refuses it."""
    raw = query.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        return error(400, f"limit must be an integer, got {raw!r}", param="limit")
    if not 1 <= limit <= maximum:
        return error(400, f"limit must be in 1..{maximum}, got {limit}", param="limit")
    return limit


def _pin_view(pin: Mapping[str, Any]) -> dict[str, Any]:
    return {"value": pin["value"], "reason": pin.get("reason", ""), "expires_at": pin.get("expires_at"),
            "source": pin.get("source"), "created_at": pin.get("created_at")}


class ControlRoutes:
    def __init__(self, engine: Engine, store, token: str, hub: EventHub, config_knobs: Mapping[str, Any],
                 ring=None, *, metrics=None) -> None:
        if not token:
            raise ValueError("the control token must not be empty")
        self.engine, self.store, self.hub, self.ring, self.metrics = engine, store, hub, ring, metrics
        self._token = token.encode()
        self.config_knobs = {k: v for k, v in dict(config_knobs).items() if v is not None}
        # Where an unpinned knob goes back to: what config put it at, else the engine's start value.
        # Build the routes before restore_pins(), so that this is not a pinned value.
        self.baseline = {**dataclasses.asdict(engine.knobs), **self.config_knobs}
        self._write_lock = threading.Lock()
        # The policy job (optd.daemon.policy_job.PolicyJob), attached by the daemon; None: no policy engine.
        self.policy = None
        r = self.router = APIRouter(prefix="/v1/control")
        r.add_api_route("/status", self.status, methods=["GET"])
        r.add_api_route("/knobs", self.knobs, methods=["GET"])
        r.add_api_route("/requests", self.requests, methods=["GET"])
        r.add_api_route("/knobs/{name}", self.pin, methods=["PUT"])
        r.add_api_route("/knobs/{name}", self.unpin, methods=["DELETE"])
        r.add_api_route("/pause", self.pause, methods=["POST"])
        r.add_api_route("/resume", self.resume, methods=["POST"])
        r.add_api_route("/decisions", self.decisions, methods=["GET"])
        r.add_api_route("/telemetry", self.telemetry, methods=["GET"])
        r.add_api_route("/events", self.events, methods=["GET"])
        r.add_api_route("/policy", self.get_policy, methods=["GET"])
        r.add_api_route("/policy", self.put_policy, methods=["PUT"])

    # -- auth --

    def _has_token(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    def _denied(self, request: Request, write: bool) -> JSONResponse | None:
        if self._has_token(request) or (not write and _is_loopback(request)):
            return None
        what = "control writes" if write else "control reads from a non-loopback address"
        return error(401, f"{what} need 'Authorization: Bearer <token>' with the daemon's control token",
                     kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    # -- shared pieces --

    def _pins(self) -> dict[str, dict[str, Any]]:
        return {k: _pin_view(p) for k, p in self.store.pins().items()}

    def _check_engine(self) -> None:
        if not self.engine.is_alive():
            raise _Failure(503, "the engine is not running", kind="server_error")

    def _record(self, knob: str, old: Any, new: Any, outcome: str, reason: str, cost_s: float | None,
                inputs: dict[str, Any], *, source: str | None = None, policy: str | None = None,
                mode: str | None = None, ts: float | None = None, flush: bool = True) -> dict[str, Any]:
        """Record a decision (an operator's, or the policy job's), count it, and return it as an event
        payload with the fields of a row of `GET decisions`. `source` defaults to inputs["source"]
        ("api", "config"). `flush=False` leaves the commit to the caller (one per policy tick)."""
        now = time.time() if ts is None else ts
        source = source if source is not None else inputs.get("source")
        self.store.add_decision(knob=knob, old_value=old, new_value=new, outcome=outcome, reason=reason,
                                inputs=inputs, cost_s=cost_s, ts=now, source=source, policy=policy,
                                mode=mode)
        if flush:
            try:
                self.store.flush()
            except Exception as e:   # the store keeps or counts the rows; the change itself stands
                log.warning("could not flush the decision on %s: %s", knob, e)
        if self.metrics is not None:
            self.metrics.record_decision(knob, outcome)
        return {"ts": now, "knob": knob, "old_value": old, "new_value": new, "outcome": outcome,
                "reason": reason, "cost_s": cost_s, "policy": policy, "mode": mode, "source": source,
                "inputs": inputs}

    def _restore(self, name: str, why: str, action: str, source: str = "api") -> dict[str, Any]:
        """Put `name` back at its baseline after its pin went away; return the event payload."""
        old = getattr(self.engine.knobs, name)
        target = self.baseline.get(name, old)
        inputs = {"source": source, "action": action}
        if target == old or not self.engine.is_alive():
            return self._record(name, old, old, "applied", f"{why}; stays at {old!r}", 0.0, inputs)
        outcome = self.engine.apply(**{name: target})[name]
        if outcome.status != "applied":
            log.warning("could not restore %s to %r: %s", name, target, outcome.reason)
            return self._record(name, old, target, "rejected", f"{why}; restoring {target!r} failed: "
                                f"{outcome.reason}", outcome.cost_s, inputs)
        return self._record(name, old, target, "applied", f"{why}; restored to {target!r}", outcome.cost_s,
                            inputs)

    # -- pins: called by the daemon --

    def restore_pins(self) -> dict[str, dict[str, Any]]:
        """Re-apply the stored pins that have not expired (at start). A pin the engine now rejects (its
        envelope changed) is dropped, with a warning and a rejected decision. Returns the pins in force."""
        with self._write_lock:
            for name, pin in self.store.pins().items():
                if name not in Knobs.names():
                    log.warning("dropping the stored pin of unknown knob %r", name)
                    self.store.delete_pin(name)
                    continue
                old = getattr(self.engine.knobs, name)
                outcome = self.engine.apply(**{name: pin["value"]})[name]
                inputs = {"source": pin.get("source") or "api", "action": "restore",
                          "expires_at": pin.get("expires_at")}
                if outcome.status == "applied":
                    log.info("restored the pin %s=%r", name, pin["value"])
                    event = self._record(name, old, outcome.value, "applied",
                                         f"pin restored at start: {pin.get('reason') or 'no reason given'}",
                                         outcome.cost_s, inputs)
                else:
                    log.warning("dropping the stored pin %s=%r: %s", name, pin["value"], outcome.reason)
                    self.store.delete_pin(name)
                    event = self._record(name, old, pin["value"], "rejected",
                                         f"stored pin dropped at start: {outcome.reason}", outcome.cost_s,
                                         inputs)
                self.hub.publish("override", event)
            return self._pins()

    def expire_pins(self, now: float | None = None) -> list[str]:
        """Remove the pins whose TTL ran out and put their knobs back at their baseline, publishing an
        "override" event each. Blocking (store, engine.apply): call it from a worker thread."""
        with self._write_lock:
            expired = self.store.expire_pins(now)
            for name in expired:
                if name in Knobs.names():
                    self.hub.publish("override", self._restore(name, "pin expired", "expire"))
            return expired

    # -- reads --

    async def status(self, request: Request):
        if denied := self._denied(request, write=False):
            return denied
        return await asyncio.to_thread(self._status)

    def _status(self) -> dict[str, Any]:
        active = self.policy.active if self.policy is not None else None
        stats = self.engine.stats()
        total = getattr(stats, "kv_blocks_total", 0) or 0
        return {
            "knobs": dataclasses.asdict(self.engine.knobs),
            "pins": self._pins(),
            "paused": bool(self.store.get_state("paused", False)),
            "policy": active.name if active is not None else None,
            "mode": active.mode if active is not None else None,
            "engine": {"alive": self.engine.is_alive(), "running": stats.requests_running,
                       "waiting": stats.requests_waiting,
                       "kv_usage": stats.kv_blocks_used / total if total else None},
        }

    async def knobs(self, request: Request):
        if denied := self._denied(request, write=False):
            return denied
        pins = await asyncio.to_thread(self._pins)
        return {"knobs": dataclasses.asdict(self.engine.knobs), "pins": pins, "configured": self.baseline,
                "ranges": self.knob_ranges()}

    def knob_ranges(self) -> dict[str, dict[str, Any]]:
        """What each knob may be set to on this engine (module docstring). Whether a knob is supported is
        asked of the engine's own check (optd.engine.knobs.check_knob) with the value it holds now, so the
        two cannot disagree; an unsupported knob's range is that value alone. The start-up config fixes
        the envelope of spec_length and max_batch_size; the others keep their natural range (DESIGN.md's
        knob table, optd.policies.schema.KNOB_LIMITS)."""
        cfg, knobs = self.engine.config, dataclasses.asdict(self.engine.knobs)
        has_drafter = getattr(self.engine, "drafter", None) is not None
        envelope = {"spec_length": (0, cfg.max_spec_length if has_drafter else 0),
                    "max_batch_size": (1, cfg.max_num_seqs)}
        ranges: dict[str, dict[str, Any]] = {}
        for name, value in knobs.items():
            why = check_knob(name, value, max_num_seqs=cfg.max_num_seqs, max_spec_length=cfg.max_spec_length,
                             has_drafter=has_drafter)
            natural = KNOB_LIMITS[name]
            lo, hi = envelope.get(name, (natural.lo, natural.hi)) if why is None else (value, value)
            ranges[name] = {"min": lo, "max": hi, "integer": isinstance(value, int), "supported": why is None}
            if why is not None:
                ranges[name]["reason"] = why
        return ranges

    async def requests(self, request: Request):
        if denied := self._denied(request, write=False):
            return denied
        limit = _limit(request.query_params, 20, MAX_RECENT_ERRORS)
        if isinstance(limit, JSONResponse):
            return limit
        stats = await asyncio.to_thread(self.engine.stats)      # as in status: it may wait for the engine
        # The OpenAI routes' request log (create_app keeps the routes on app.state): None in an app that
        # serves only the control API.
        request_log = getattr(getattr(request.app.state, "openai", None), "requests", None)
        recent = request_log.recent_errors if request_log is not None else None
        return JSONResponse(jsonable({
            "running": stats.requests_running, "waiting": stats.requests_waiting,
            "recent_errors": recent.latest(limit) if recent is not None else [],
            "error_counts": recent.counts() if recent is not None else {}}))

    async def decisions(self, request: Request):
        if denied := self._denied(request, write=False):
            return denied
        q = request.query_params
        limit = _limit(q, 100, MAX_DECISIONS)
        if isinstance(limit, JSONResponse):
            return limit
        knob, outcome = q.get("knob"), q.get("outcome")
        if knob is not None and knob not in Knobs.names():
            return error(400, f"unknown knob {knob!r} (knobs: {', '.join(Knobs.names())})", param="knob")
        if outcome is not None and outcome not in OUTCOMES:
            return error(400, f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}",
                         param="outcome")
        rows = await asyncio.to_thread(self.store.decisions, limit=limit, knob=knob, outcome=outcome)
        return JSONResponse(jsonable({"decisions": rows}))

    async def telemetry(self, request: Request):
        if denied := self._denied(request, write=False):
            return denied
        raw = request.query_params.get("seconds", "60")
        try:
            seconds = float(raw)
        except ValueError:
            return error(400, f"seconds must be a number, got {raw!r}", param="seconds")
        if not 0 < seconds <= MAX_TELEMETRY_S:
            return error(400, f"seconds must be in (0, {MAX_TELEMETRY_S:g}], got {raw}", param="seconds")
        since = time.time() - seconds
        if self.ring is not None:
            samples = [s for s in self.ring.samples() if (s.get("ts") or 0) >= since]
        else:
            samples = await asyncio.to_thread(self.store.recent_samples, since)
        return JSONResponse(jsonable({"samples": samples}))

    async def events(self, request: Request):
        if denied := self._denied(request, write=False):
            return denied
        kinds = {k for k in request.query_params.get("kinds", "").split(",") if k} or None
        sub = self.hub.subscribe()
        return StreamingResponse(self._stream(sub, kinds), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(self, sub, kinds: set[str] | None) -> AsyncIterator[str]:
        reported = 0
        try:
            yield ": connected\n\n"
            while True:
                try:
                    event = await sub.get(timeout=KEEPALIVE_S)
                except StopAsyncIteration:
                    return
                if sub.dropped > reported:
                    yield sse_message("dropped", {"count": sub.dropped - reported})
                    reported = sub.dropped
                if event is None:
                    yield ": keepalive\n\n"
                elif kinds is None or event[0] in kinds:
                    yield sse_message(*event)
        finally:
            sub.close()

    # -- writes --

    def _refuse_knob_write(self, request: Request, name: str) -> JSONResponse | None:
        """401 without the token, 404 for a knob that does not exist, else None."""
        if denied := self._denied(request, write=True):
            return denied
        try:
            self._check_knob(name)
        except _Failure as f:
            return f.response
        return None

    @staticmethod
    def _check_knob(name: str) -> None:
        if name not in Knobs.names():
            raise _Failure(404, f"unknown knob {name!r} (knobs: {', '.join(Knobs.names())})",
                           param="name", kind="not_found_error")

    async def pin(self, name: str, request: Request):
        if refused := self._refuse_knob_write(request, name):
            return refused
        req = await parse_body(request, PinRequest, unknown_field="is not a known field")
        if isinstance(req, JSONResponse):
            return req
        try:
            return await self.pin_knob(name, req)
        except _Failure as f:
            return f.response

    async def pin_knob(self, name: str, req: PinRequest, source: str = "api") -> dict[str, Any]:
        """Pin knob `name` at req.value (PUT knobs/{name}; MQTT "pin"), publish the "override" event, and
        return the result. Raises ActionRefused (unknown knob, a value the engine rejects, ...)."""
        self._check_knob(name)
        result, event = await asyncio.to_thread(self._pin, name, req, source)
        self.hub.publish("override", event)
        return result

    def _pin(self, name: str, req: PinRequest, source: str = "api") -> tuple[dict[str, Any], dict[str, Any]]:
        with self._write_lock:
            self._check_engine()
            old = getattr(self.engine.knobs, name)
            outcome = self.engine.apply(**{name: req.value})[name]
            if outcome.status != "applied":
                raise _Failure(400, outcome.reason or f"{name}: {outcome.status}", param="value")
            try:
                pin = self.store.set_pin(name, outcome.value, reason=req.reason, ttl_s=req.ttl_s,
                                         source=source)
            except Exception as e:
                log.error("could not store the pin %s=%r, undoing it: %s", name, req.value, e)
                self.engine.apply(**{name: old})
                raise _Failure(503, f"could not store the pin: {e}", kind="server_error") from e
            reason = f"pinned by operator: {req.reason}" if req.reason else "pinned by operator"
            event = self._record(name, old, outcome.value, "applied", reason, outcome.cost_s,
                                 {"source": source, "action": "pin", "expires_at": pin["expires_at"]})
            result = {"knob": name, "value": outcome.value, "pin": _pin_view(pin), "cost_s": outcome.cost_s}
            return result, event

    async def unpin(self, name: str, request: Request):
        if refused := self._refuse_knob_write(request, name):
            return refused
        try:
            return await self.unpin_knob(name)
        except _Failure as f:
            return f.response

    async def unpin_knob(self, name: str, source: str = "api") -> dict[str, Any]:
        """Release the pin on `name` (DELETE knobs/{name}; MQTT "unpin"): the knob goes back to its
        baseline; publish the "override" event. Raises ActionRefused (unknown knob, not pinned, ...)."""
        self._check_knob(name)
        result, event = await asyncio.to_thread(self._unpin, name, source)
        self.hub.publish("override", event)
        return result

    def _unpin(self, name: str, source: str = "api") -> tuple[dict[str, Any], dict[str, Any]]:
        with self._write_lock:
            self._check_engine()
            if not self.store.delete_pin(name):
                raise _Failure(404, f"{name} is not pinned", param="name", kind="not_found_error")
            event = self._restore(name, "unpinned by operator", "unpin", source)
            return {"knob": name, "value": getattr(self.engine.knobs, name), "outcome": event["outcome"],
                    "reason": event["reason"]}, event

    async def get_policy(self, request: Request):
        if denied := self._denied(request, write=False):
            return denied
        if self.policy is None:
            return {"name": None, "source": None, "mode": None, "yaml": None, "version_id": None}
        return JSONResponse(jsonable(await asyncio.to_thread(self.policy.describe)))

    async def put_policy(self, request: Request):
        if denied := self._denied(request, write=True):
            return denied
        if self.policy is None:
            return error(503, "this daemon runs no policy engine", kind="server_error")
        req = await parse_body(request, PolicyRequest,
                               unknown_field="is not a known field (give name or yaml)")
        if isinstance(req, JSONResponse):
            return req
        if (req.name is None) == (req.yaml is None):
            return error(400, "give exactly one of 'name' (a policy name) or 'yaml' (a policy document)")
        try:
            view = await self.policy.switch_request(name=req.name, yaml_text=req.yaml)
        except PolicyError as e:
            return error(400, "; ".join(str(err) for err in e.errors),
                         param="name" if req.name is not None else "yaml")
        return JSONResponse(jsonable(view))

    async def pause(self, request: Request):
        return await self._set_paused(request, True)

    async def resume(self, request: Request):
        return await self._set_paused(request, False)

    async def _set_paused(self, request: Request, paused: bool):
        if denied := self._denied(request, write=True):
            return denied
        return await self.set_paused(paused)

    async def set_paused(self, paused: bool) -> dict[str, Any]:
        """Pause or resume automation (POST pause|resume; MQTT "pause"|"resume") and publish the event."""
        await asyncio.to_thread(self.store.set_state, "paused", paused)
        self.hub.publish("pause" if paused else "resume", {"ts": time.time(), "paused": paused})
        return {"paused": paused}

    async def set_policy(self, name: str) -> dict[str, Any]:
        """Switch to the policy called `name` (a preset or search-path name, as PUT policy {"name": ...};
        MQTT "set_policy") and return the new policy's view. Raises ActionRefused when no policy engine
        runs or the policy is unknown or invalid (the running policy stays)."""
        if self.policy is None:
            raise _Failure(503, "policy switching not available (this daemon runs no policy engine)",
                           kind="server_error")
        try:
            return await self.policy.switch_request(name=name)
        except PolicyError as e:
            raise _Failure(400, "; ".join(str(err) for err in e.errors), param="name") from None

    def status_view(self) -> dict[str, Any]:
        """GET status's JSON (blocking: the store and the engine's stats; call it in a worker thread)."""
        return self._status()
