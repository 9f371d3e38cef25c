"""The daemon's HTTP API as `optd top` uses it: httpx (async), JSON into pydantic models, and the SSE
event stream of `/v1/control/events`.

Two kinds of failure: `ApiError` when the daemon answered and refused (its status and message, e.g. a
pin out of range), `Unreachable` when there is no answer (connection refused, a timeout, the event
stream ended). `feed.Feed` reconnects on `Unreachable`; the screens show an `ApiError`'s message.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from optd.tui.models import (
    Decision,
    DecisionList,
    KnobsInfo,
    PolicyInfo,
    RequestsInfo,
    ServerInfo,
    Status,
    parse_sample,
)
from optd.tui.sse import SseParser

READ_TIMEOUT_S = 10.0
# Writes wait for the engine's next step boundary (a pin) or for a policy to load and compile.
WRITE_TIMEOUT_S = 30.0
# The daemon sends a keepalive comment every 15 s: a stream silent for longer is dead.
STREAM_IDLE_S = 20.0

_BUILD_INFO = re.compile(r"^optd_build_info\{(?P<labels>[^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ApiError(Exception):
    """The daemon refused a request; `message` is its own words."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param = status, message, param


class Unreachable(Exception):
    """No usable answer from the daemon (connection refused, timed out, stream ended, garbage)."""


def _error(response: httpx.Response) -> ApiError:
    message, param = response.reason_phrase or "error", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):     # OpenAI's error format, what the control API answers
            message, param = str(err.get("message") or message), err.get("param")
        elif "detail" in body:        # FastAPI's own 404/405
            message = str(body["detail"])
    return ApiError(response.status_code, message, param)


def check_url(url: str) -> str:
    """`url` without a trailing slash; ValueError for anything but http(s)://HOST[:PORT][/path]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--url: expected http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


class DaemonClient:
    """One daemon at `url`. `token` goes with every request (writes need it; loopback reads don't)."""

    def __init__(self, url: str, token: str | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = check_url(url)
        self.label = urlsplit(url).netloc
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, transport=transport,
                                       timeout=httpx.Timeout(READ_TIMEOUT_S))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, *, json_body: Any = None, params: dict | None = None,
                    timeout: float = READ_TIMEOUT_S) -> Any:
        try:
            response = await self._http.request(method, path, json=json_body, params=params, timeout=timeout)
        except httpx.HTTPError as e:
            raise Unreachable(f"cannot reach the daemon at {self.url}: {_why(e)}") from None
        if response.status_code >= 400:
            raise _error(response)
        try:
            return response.json()
        except ValueError:
            raise Unreachable(f"{method} {path}: the daemon's answer is not JSON") from None

    async def _read(self, path: str, model: type, **params: Any):
        given = {k: v for k, v in params.items() if v is not None}
        body = await self._call("GET", path, params=given or None)
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise Unreachable(f"GET {path}: unexpected answer: {e.errors()[0]['msg']}") from None

    # -- reads --

    async def status(self) -> Status:
        return await self._read("/v1/control/status", Status)

    async def decisions(self, limit: int = 200, knob: str | None = None,
                        outcome: str | None = None) -> list[Decision]:
        answer = await self._read("/v1/control/decisions", DecisionList, limit=limit, knob=knob,
                                  outcome=outcome)
        return answer.decisions

    async def telemetry(self, seconds: float) -> list[dict[str, float | None]]:
        body = await self._call("GET", "/v1/control/telemetry", params={"seconds": f"{seconds:g}"})
        try:
            return [parse_sample(s) for s in body["samples"]]
        except (KeyError, TypeError, ValueError) as e:
            raise Unreachable(f"GET /v1/control/telemetry: unexpected answer: {e}") from None

    async def policy(self) -> PolicyInfo | None:
        """The running policy; None from a daemon without the endpoint (older than the policy engine)."""
        try:
            return await self._read("/v1/control/policy", PolicyInfo)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def knob_ranges(self) -> dict[str, dict[str, Any]]:
        """Per knob, what this engine accepts (GET knobs' `ranges`); {} from a daemon that does not say."""
        return (await self._read("/v1/control/knobs", KnobsInfo)).ranges

    async def requests(self) -> RequestsInfo | None:
        """The queue and the recent failed requests; None from a daemon without the endpoint."""
        try:
            return await self._read("/v1/control/requests", RequestsInfo)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def info(self) -> ServerInfo:
        models = await self._call("GET", "/v1/models")
        listed = models.get("data") if isinstance(models, dict) else None
        model = next((m.get("id") for m in listed or [] if isinstance(m, dict)), None)
        labels: dict[str, str] = {}
        try:
            metrics = await self._http.get("/metrics", headers={"Accept": "text/plain"})
            if match := _BUILD_INFO.search(metrics.text):
                labels = dict(_LABEL.findall(match["labels"]))
        except httpx.HTTPError:
            pass              # the header shows "?" for the device; nothing else depends on it
        return ServerInfo(model=model, device=labels.get("device"), version=labels.get("version"))

    # -- writes (need the token) --

    async def pin(self, knob: str, value: int | float, ttl_s: float | None = None, reason: str = "") -> dict:
        body: dict[str, Any] = {"value": value, "reason": reason}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return await self._call("PUT", f"/v1/control/knobs/{knob}", json_body=body, timeout=WRITE_TIMEOUT_S)

    async def unpin(self, knob: str) -> dict:
        return await self._call("DELETE", f"/v1/control/knobs/{knob}", timeout=WRITE_TIMEOUT_S)

    async def set_paused(self, paused: bool) -> dict:
        path = f"/v1/control/{'pause' if paused else 'resume'}"
        return await self._call("POST", path, timeout=WRITE_TIMEOUT_S)

    async def set_policy(self, *, name: str | None = None, yaml_text: str | None = None) -> dict:
        body = {"name": name} if name is not None else {"yaml": yaml_text}
        return await self._call("PUT", "/v1/control/policy", json_body=body, timeout=WRITE_TIMEOUT_S)

    # -- the event stream --

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """("connected", {}) once the stream is open, then each event as (kind, data). Raises
        Unreachable when the stream fails or ends (the daemon closes it when it stops)."""
        timeout = httpx.Timeout(READ_TIMEOUT_S, read=STREAM_IDLE_S)
        try:
            async with self._http.stream("GET", "/v1/control/events", timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error(response)
                yield "connected", {}
                parser = SseParser()
                async for line in response.aiter_lines():
                    if (event := parser.feed(line)) is None:
                        continue
                    try:
                        data = json.loads(event.data)
                    except ValueError:
                        continue      # one garbled event is not worth a reconnect
                    if isinstance(data, dict):
                        yield event.kind, data
        except httpx.HTTPError as e:
            raise Unreachable(f"lost the event stream from {self.url}: {_why(e)}") from None
        raise Unreachable(f"the daemon at {self.url} closed the event stream")


def _why(e: httpx.HTTPError) -> str:
    if isinstance(e, httpx.ConnectError):
        return "cannot connect"          # httpx's own words ("All connection attempts failed") say less
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    return str(e) or type(e).__name__
