"""What an operator may pin a knob to, checked in the pin modal before anything is sent.

The knob's range is the tightest one known: the envelope the daemon reports in `GET knobs` under
`ranges` (where it does: {"min", "max", "integer", "supported", "reason"} per knob), else the knob's
natural range from the policy schema (the one range every engine shares, optd.policies.schema). A knob
the daemon reports `supported: false` takes no value at all. The daemon checks again against its
engine's envelope and the modal shows its refusal; what the modal refuses first never reaches the daemon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from optd.policies.durations import parse_duration
from optd.policies.schema import KNOB_LIMITS, knob_value_problem


@dataclass(frozen=True)
class KnobRange:
    lo: float
    hi: float
    integer: bool
    supported: bool = True
    reason: str = ""                  # why not, when not supported

    def describe(self) -> str:
        if not self.supported:
            return f"not adjustable on this engine ({self.reason or 'the daemon says so'})"
        hi = "" if math.isinf(self.hi) else f"{self.hi:g}"
        kind = "whole number" if self.integer else "number"
        return f"{kind} in {self.lo:g}..{hi}" if hi else f"{kind} ≥ {self.lo:g}"


def knob_range(knob: str, reported: dict | None = None) -> KnobRange:
    """The range to check `knob` against; `reported` is the daemon's range for it (its `ranges` entry), if
    any. A malformed entry is ignored: the daemon checks again anyway."""
    natural = KNOB_LIMITS[knob]
    lo, hi = natural.lo, natural.hi
    if not reported:
        return KnobRange(lo, hi, natural.integer)
    try:
        lo = max(lo, float(reported.get("min", lo)))
        hi = min(hi, float(reported.get("max", hi)))
    except (TypeError, ValueError):
        lo, hi = natural.lo, natural.hi
    return KnobRange(lo, hi, natural.integer, supported=reported.get("supported") is not False,
                     reason=str(reported.get("reason") or ""))


def parse_value(knob: str, text: str, reported: dict | None = None) -> int | float:
    """The value typed for `knob`, as the JSON number to send; ValueError says what is wrong."""
    text = text.strip()
    allowed = knob_range(knob, reported)
    if not allowed.supported:
        raise ValueError(f"value: {knob} is {allowed.describe()}")
    if not text:
        raise ValueError("value: enter a number")
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"value: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"value: {text!r} is not a finite number")
    if allowed.integer and not number.is_integer():
        raise ValueError(f"value: {knob} must be a whole number, got {text}")
    if not allowed.lo <= number <= allowed.hi:
        raise ValueError(f"value: {knob} must be a {allowed.describe()}, got {text}")
    if problem := knob_value_problem(knob, number):
        raise ValueError(f"value: {problem}")
    return int(number) if allowed.integer else number


def parse_ttl(text: str) -> float | None:
    """The pin's TTL in seconds (90, 90s, 10m, 1h); empty means no expiry."""
    text = text.strip()
    if not text:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise ValueError(f"ttl: {e}") from None
    if seconds <= 0:
        raise ValueError(f"ttl: must be more than 0 seconds, got {text}")
    return seconds
