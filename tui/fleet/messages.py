"""What the bridge publishes, as pydantic models (optd.daemon.mqtt's docstring has the topics). Lenient:
unknown fields are ignored, so a newer daemon's messages still read."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from optd.tui.models import Number, Pin

# leaf topics under <prefix>/<node>/ the fleet view reads, with the QoS it subscribes at
SUBSCRIBED = {"status": 1, "knobs": 1, "telemetry": 0, "decisions": 1, "cmd/result": 1}
FLEET_LEVEL = "all"        # <prefix>/all/cmd/set: fleet-wide commands; never a node's name


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class KnobsMessage(_Message):
    """The retained `knobs` message: the node's knobs, pins, policy and pause state, and where its HTTP
    API listens (`url`; missing from daemons older than the fleet view)."""

    ts: float | None = None
    node: str | None = None
    model: str | None = None
    url: str | None = None
    knobs: dict[str, Number] = {}
    pins: dict[str, Pin] = {}
    paused: bool = False
    policy: str | None = None
    mode: str | None = None


class CommandResult(_Message):
    """A reply on `cmd/result` (optd.daemon.mqtt_commands)."""

    id: str | int | None = None
    node: str | None = None
    action: str | None = None
    outcome: str
    reason: str | None = None
    result: Any = None


def split_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(node, leaf) of `<prefix>/<node>/<leaf>`; None for anything else."""
    if not topic.startswith(prefix + "/"):
        return None
    node, _, leaf = topic[len(prefix) + 1:].partition("/")
    if not node or not leaf or node == FLEET_LEVEL:
        return None
    return node, leaf
