"""What the fleet view shows, kept up to date from the broker's messages. No I/O, no widgets: `link`
feeds it, the widgets read it, tests can drive it directly. A message that does not read is counted and
dropped; it never stops the others."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from optd.tui.client import check_url
from optd.tui.fleet.commands import FleetCommand
from optd.tui.fleet.messages import CommandResult, KnobsMessage, split_topic
from optd.tui.models import Decision, parse_sample

Connection = Literal["connecting", "live", "disconnected"]
MAX_DECISIONS = 30            # per node, for its detail view
MAX_COMMANDS = 10
ANSWER_WAIT_S = 10.0          # a node that has not answered by then: "no answer" (commands off?)


@dataclass
class NodeView:
    name: str
    status: str | None = None                    # the retained "online" / "offline"; None: not said
    knobs: KnobsMessage | None = None
    sample: dict[str, float | None] | None = None
    decisions: deque[Decision] = field(default_factory=lambda: deque(maxlen=MAX_DECISIONS))
    seen_at: float | None = None                 # our clock, at its last message

    @property
    def online(self) -> bool:
        return self.status == "online"

    @property
    def url(self) -> str | None:
        """The node's HTTP API, if it announced a usable one (http[s]://HOST:PORT)."""
        if self.knobs is None or not self.knobs.url:
            return None
        try:
            return check_url(self.knobs.url)
        except ValueError:
            return None

    def metric(self, name: str) -> float | None:
        return self.sample.get(name) if self.sample else None

    def knob(self, name: str) -> int | float | None:
        """The knob's value: the latest sample's (once a second), else the retained `knobs` message's."""
        value = self.metric(name)
        if value is not None:
            return int(value) if value.is_integer() and name in ("spec_length", "max_batch_size") else value
        return self.knobs.knobs.get(name) if self.knobs else None

    def forgotten(self) -> bool:
        """Its retained state was cleared and nothing else is known: drop it from the list."""
        return self.status is None and self.knobs is None and self.sample is None


@dataclass
class SentCommand:
    command: FleetCommand
    sent_at: float
    expected: list[str]                          # the nodes online when it was sent
    results: dict[str, CommandResult] = field(default_factory=dict)

    def pending(self) -> list[str]:
        """Expected nodes that have not answered."""
        return [n for n in self.expected if n not in self.results]

    def waiting(self, now: float) -> bool:
        """Still worth waiting for the pending ones (after ANSWER_WAIT_S they show as "no answer")."""
        return bool(self.pending()) and now - self.sent_at < ANSWER_WAIT_S


@dataclass
class FleetState:
    broker: str                                  # mqtt://host:port, for the header
    prefix: str
    connection: Connection = "connecting"
    problem: str = ""
    retry_at: float | None = None
    nodes: dict[str, NodeView] = field(default_factory=dict)
    commands: list[SentCommand] = field(default_factory=list)      # newest first
    bad_messages: int = 0
    last_problem: str = ""

    # -- connection --

    def connected(self) -> None:
        self.connection, self.problem, self.retry_at = "live", "", None

    def disconnected(self, problem: str, retry_at: float | None) -> None:
        self.connection, self.problem, self.retry_at = "disconnected", problem, retry_at

    # -- messages --

    def receive(self, topic: str, payload: bytes, now: float) -> None:
        where = split_topic(self.prefix, topic)
        if where is None:
            return
        name, leaf = where
        try:
            self._receive(name, leaf, payload, now)
        except (ValidationError, ValueError, TypeError) as e:      # JSONDecodeError is a ValueError
            self.bad_messages += 1
            self.last_problem = f"{topic}: {_short(e)}"

    def _receive(self, name: str, leaf: str, payload: bytes, now: float) -> None:
        if leaf == "cmd/result":
            self._result(CommandResult.model_validate_json(payload))
            return
        node = self.nodes.get(name) or NodeView(name)
        if leaf == "status":
            text = payload.decode("utf-8", "replace").strip()
            if text not in ("", "online", "offline"):
                raise ValueError(f"status must be online or offline, got {text[:20]!r}")
            node.status = text or None           # an empty retained message clears the topic
        elif leaf == "knobs":
            node.knobs = KnobsMessage.model_validate_json(payload) if payload else None
        elif leaf == "telemetry":
            node.sample = parse_sample(json.loads(payload))
        elif leaf == "decisions":
            node.decisions.appendleft(Decision.model_validate_json(payload))
        else:
            return                               # a topic this version does not read
        if node.forgotten():
            self.nodes.pop(name, None)
            return
        if payload:
            node.seen_at = now
        self.nodes[name] = node

    def _result(self, result: CommandResult) -> None:
        sent = next((c for c in self.commands if c.command.id == result.id), None)
        if sent is not None and result.node:     # another operator's commands are not ours to show
            sent.results[result.node] = result

    # -- commands --

    def sent(self, command: FleetCommand, now: float) -> SentCommand:
        record = SentCommand(command, now, [n.name for n in self.sorted_nodes() if n.online])
        self.commands = [record, *self.commands][:MAX_COMMANDS]
        return record

    # -- what the widgets read --

    def sorted_nodes(self) -> list[NodeView]:
        return [self.nodes[name] for name in sorted(self.nodes)]

    @property
    def live(self) -> bool:
        return self.connection == "live"


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}"
    return str(e)[:200]
