"""Fleet-wide commands: what `p`, `r` and `s` publish on `<prefix>/all/cmd/set`.

The payload is the daemon's command format (optd.daemon.mqtt_commands): a JSON object with an `id` and an
`action`. With a shared secret it is signed exactly as the daemon checks it: `ts` (seconds since the
epoch) and `hmac`, the lowercase hex HMAC-SHA256 keyed with the secret's UTF-8 bytes of the command
without `hmac` as canonical JSON (keys sorted, separators "," and ":", non-ASCII as itself, UTF-8).
A node without a secret ignores `ts` and `hmac`, so one signed command serves a mixed fleet.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["pause", "resume", "set_policy"]


class FleetCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=lambda: f"fleet-{uuid.uuid4().hex[:12]}")
    action: Action
    name: str | None = Field(default=None, min_length=1, max_length=128)    # set_policy's policy

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def describe(self) -> str:
        return f"set policy {self.name}" if self.action == "set_policy" else self.action


def canonical(body: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in body.items() if k != "hmac"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(body: dict[str, Any], secret: str) -> str:
    return hmac.new(secret.encode(), canonical(body), hashlib.sha256).hexdigest()


def encode(command: FleetCommand, secret: str | None = None, now: float | None = None) -> bytes:
    """The payload to publish; signed (with `ts` now) when `secret` is given."""
    body = command.body()
    if secret:
        body["ts"] = time.time() if now is None else now
        body["hmac"] = sign(body, secret)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
