"""What the dashboard shows, kept up to date from the daemon's answers and events. No I/O, no widgets:
`feed.Feed` fills it, the widgets read it, and tests can drive it directly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from optd.tui.models import Decision, PolicyInfo, RequestsInfo, ServerInfo, Status, parse_sample

Connection = Literal["connecting", "live", "disconnected"]
WINDOWS_S = (60.0, 300.0, 900.0)            # the chart windows `w` cycles through
MAX_SAMPLES = 1200                           # the longest window at 1 Hz, with room to spare
MAX_DECISIONS = 500


@dataclass
class Snapshot:
    """Everything read on (re)connect."""

    status: Status
    info: ServerInfo | None
    policy: PolicyInfo | None
    samples: list[dict[str, float | None]]
    decisions: list[Decision]
    ranges: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: RequestsInfo | None = None


@dataclass
class DashboardState:
    label: str                                   # which daemon: host:port
    connection: Connection = "connecting"
    problem: str = ""                            # why it is disconnected
    retry_at: float | None = None
    info: ServerInfo | None = None
    status: Status | None = None
    policy: PolicyInfo | None = None
    knobs: dict[str, int | float] = field(default_factory=dict)
    samples: deque[dict[str, float | None]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    decisions: list[Decision] = field(default_factory=list)
    window_s: float = WINDOWS_S[0]
    knob_filter: str | None = None
    outcome_filter: str | None = None
    events_dropped: int = 0
    ranges: dict[str, dict[str, Any]] = field(default_factory=dict)     # what the engine accepts, per knob
    requests: RequestsInfo | None = None         # the queue and the recent failed requests

    # -- connection --

    def connected(self, snap: Snapshot) -> None:
        self.connection, self.problem, self.retry_at = "live", "", None
        self.info, self.policy = snap.info or self.info, snap.policy
        self.set_status(snap.status)
        self.samples.clear()
        for sample in sorted(snap.samples, key=lambda s: s["ts"] or 0):
            self._add_sample(sample)
        self.decisions = _newest_first(snap.decisions)
        self.ranges, self.requests = snap.ranges, snap.requests

    def disconnected(self, problem: str, retry_at: float | None) -> None:
        self.connection, self.problem, self.retry_at = "disconnected", problem, retry_at

    @property
    def live(self) -> bool:
        return self.connection == "live"

    # -- updates --

    def set_status(self, status: Status) -> None:
        self.status = status
        self.knobs = dict(status.knobs)

    def set_paused(self, paused: bool) -> None:
        if self.status is not None:
            self.status = self.status.model_copy(update={"paused": paused})

    def apply_event(self, kind: str, data: dict[str, Any]) -> bool:
        """Take one event from the stream; True if the status should be read again (a pin or the
        policy changed, or an event this version does not know)."""
        try:
            if kind == "sample":
                self._add_sample(parse_sample(data))
                return False
            if kind in ("pause", "resume"):
                self.set_paused(bool(data.get("paused", kind == "pause")))
                return False
            if kind == "policy":          # a policy became active (PUT policy, SIGHUP)
                self.policy = PolicyInfo.model_validate(data)
                return True
            if kind == "dropped":
                self.events_dropped += int(data.get("count", 0))
                return True
            if "knob" in data and "outcome" in data:
                self.add_decision(Decision.model_validate(data))
                return kind != "decision"     # an override moved a pin
        except (ValidationError, ValueError, TypeError):
            return True                       # unreadable: the next status read catches up
        return True

    def _add_sample(self, sample: dict[str, float | None]) -> None:
        if self.samples and (sample["ts"] or 0) <= (self.samples[-1]["ts"] or 0):
            return                            # a replayed sample after a reconnect
        self.samples.append(sample)
        for name, current in self.knobs.items():
            value = sample.get(name)
            if value is not None:             # the sample has floats; keep ints for int knobs
                self.knobs[name] = int(value) if isinstance(current, int) and value.is_integer() else value

    def add_decision(self, decision: Decision) -> None:
        if any(d.key == decision.key for d in self.decisions[:50]):
            return
        self.decisions = _newest_first([decision, *self.decisions])[:MAX_DECISIONS]

    def replace_decisions(self, decisions: list[Decision]) -> None:
        self.decisions = _newest_first(decisions)

    # -- what the widgets read --

    def series(self, metric: str, now: float) -> list[float]:
        """`metric`'s values in the chart window, oldest first, without the samples that had none."""
        since = now - self.window_s
        return [v for s in self.samples if (s["ts"] or 0) >= since and (v := s.get(metric)) is not None]

    def latest(self, metric: str) -> float | None:
        """The newest value of `metric` (within the last few samples: an old value is not "now")."""
        for sample in list(self.samples)[-1:-6:-1]:
            if (value := sample.get(metric)) is not None:
                return value
        return None

    def last_change(self, knob: str) -> Decision | None:
        """The newest decision that moved `knob`."""
        return next((d for d in self.decisions if d.knob == knob and d.outcome == "applied"
                     and d.old_value != d.new_value), None)

    def visible_decisions(self) -> list[Decision]:
        return [d for d in self.decisions
                if (self.knob_filter is None or d.knob == self.knob_filter)
                and (self.outcome_filter is None or d.outcome == self.outcome_filter)]

    def next_window(self) -> float:
        i = WINDOWS_S.index(self.window_s) if self.window_s in WINDOWS_S else -1
        self.window_s = WINDOWS_S[(i + 1) % len(WINDOWS_S)]
        return self.window_s


def _newest_first(decisions: list[Decision]) -> list[Decision]:
    return sorted(decisions, key=lambda d: (d.ts, d.id or 0), reverse=True)
