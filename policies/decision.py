"""A Decision: one record of what the policy did (or would have done) to one knob, and why.

Decisions are the audit trail operators read to answer "why did it change this?": each carries the
time, the knob, old -> new, what decided it (`source`), the metric values it looked at (`inputs`), the
reason in words and what became of it (`outcome`). They are stored, streamed and counted by the daemon.

Outcomes:
- `applied`: the evaluator asks the caller to apply `new` (the caller rewrites it to `rejected` or
  `rolled_back` with the engine's reason when the engine refuses or faults).
- `paused`, `observe`, `pinned`: the policy would have moved the knob but actuation is paused, the policy
  only observes, or an operator pinned the knob; nothing is applied.
- `held`: a guardrail veto or damping kept a firing rule (or a vetoed change) from moving the knob; `new`
  is the value it wanted.
- `rejected` with `new` None: the engine does not support the knob; reported once, then skipped.
"""

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

Outcome = Literal["applied", "rejected", "rolled_back", "paused", "observe", "pinned", "held"]
OUTCOMES: tuple[str, ...] = Outcome.__args__


class Decision(BaseModel):
    # Not frozen: the caller rewrites `outcome`, `reason` and `cost_s` after applying.
    model_config = ConfigDict(extra="forbid")

    ts: float
    knob: str
    old: float | None
    new: float | None
    source: str                       # "policy:<name>/<controller or rule name>" or "guardrail:<name>"
    inputs: dict[str, float | None] = {}
    reason: str
    outcome: Outcome
    cost_s: float = 0.0

    def summary(self) -> str:
        """One line for logs and `optd policy replay`: time, knob old -> new, outcome, source, reason."""
        when = datetime.fromtimestamp(self.ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
        return (f"{when} {self.knob} {_fmt(self.old)} -> {_fmt(self.new)} [{self.outcome}] "
                f"{self.source}: {self.reason}")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
