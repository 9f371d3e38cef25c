"""Damping: turn a recommendation into a move that cannot flap.

Kubernetes HPA semantics (its reason for stabilization windows is ours): every recommendation is kept
with its time, per knob. To move a knob up, the lowest recommendation of the up window must still be
above the current value (every recent recommendation agreed it should go up, and it goes only as far as
the most modest of them); to move it down, the highest recommendation of the down window must be below
it. A noisy controller whose recommendation crosses the current value back and forth therefore holds.
Then, in this order:

1. tolerance: a move smaller than the knob's `tolerance` (absolute, in the knob's unit) is not made;
2. `max_step`: one decision moves at most this far (in the knob's unit; for `weight_bits` in levels of
   the 4/8/16 ladder; integer knobs move at least 1 when max_step < 1);
3. the value is clamped to [min, max] and kept in the knob's value space: integer knobs stay integers,
   `weight_bits` is one of 4, 8, 16, `kv_compression` is rounded to 1e-6.

Bounds are constraints, not recommendations: a current value outside [min, max] (a new policy, a
narrower engine envelope) is brought inside at once, whatever the window and max_step say.

Rounding goes in the direction of the move (up: ceil, down: floor), so any recommended move of a
fraction of a unit becomes one unit rather than nothing, and a move never overshoots the recommendation
by more than that unit.

An `urgent` recommendation (a controller's safety move, e.g. aimd halving the batch on an SLO breach)
skips its direction's stabilization window and max_step, since it is already based on a window of
measurements and is its own bound (a halving is the "multiplicative decrease" of AIMD: capped at
max_step 1, as in the balanced preset, it would take minutes to end a breach); it is still recorded,
and bounded by tolerance and clamping.
"""

import math
from collections import deque
from dataclasses import dataclass

from optd.policies.schema import Behavior, Direction

INTEGER_KNOBS = frozenset({"spec_length", "max_batch_size"})
WEIGHT_BITS_LEVELS = (4.0, 8.0, 16.0)
# The knobs' natural ranges (DESIGN.md; max_batch_size is bounded by the engine's max_num_seqs, which the
# evaluator learns from its knob_bounds).
NATURAL_BOUNDS: dict[str, tuple[float, float]] = {
    "spec_length": (0.0, 32.0),
    "kv_compression": (0.0, 0.95),
    "weight_bits": (4.0, 16.0),
    "max_batch_size": (1.0, math.inf),
}
EPS = 1e-9


def same(a: float | None, b: float | None) -> bool:
    """Equal as knob values (float knobs carry rounding noise)."""
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-7


def levels_within(lo: float, hi: float) -> list[float]:
    """The weight_bits levels inside [lo, hi] (at least one: the nearest level when none lies inside)."""
    inside = [lv for lv in WEIGHT_BITS_LEVELS if lo - EPS <= lv <= hi + EPS]
    return inside or [min(WEIGHT_BITS_LEVELS, key=lambda lv: abs(lv - (lo + hi) / 2))]


def quantize(knob: str, value: float, current: float, lo: float, hi: float) -> float:
    """`value` clamped to [lo, hi] and put into the knob's value space, rounding in the direction of the
    move from `current`."""
    value = min(max(value, lo), hi)
    up = value > current
    if knob in INTEGER_KNOBS:
        v = math.ceil(value - EPS) if up else math.floor(value + EPS)
        # Rounding may leave [lo, hi] when the bounds are not integers: take the integers inside.
        v = min(max(v, math.ceil(lo - EPS)), math.floor(hi + EPS))
        return float(v)
    if knob == "weight_bits":
        levels = levels_within(lo, hi)
        if up:
            return next((lv for lv in levels if lv >= value - EPS), levels[-1])
        return next((lv for lv in reversed(levels) if lv <= value + EPS), levels[0])
    return round(value, 6)


def step_limit(knob: str, current: float, target: float, max_step: float | None,
               lo: float, hi: float) -> float:
    """`target` moved no further than `max_step` from `current` (weight_bits: max_step levels)."""
    if max_step is None:
        return target
    up = target > current
    if knob == "weight_bits":
        n = max(1, math.floor(max_step + EPS))
        ladder = levels_within(lo, hi)
        ahead = [lv for lv in ladder if lv > current + EPS] if up else \
            [lv for lv in reversed(ladder) if lv < current - EPS]
        if len(ahead) > n:
            return ahead[n - 1]
        return target
    step = max(1.0, math.floor(max_step + EPS)) if knob in INTEGER_KNOBS else max_step
    return min(target, current + step) if up else max(target, current - step)


@dataclass(frozen=True)
class Damped:
    """The outcome of damping one recommendation."""

    value: float               # the value to move to; equals the current value when nothing moves
    desired: float             # the recommendation after clamping and quantizing
    held_by: str | None = None     # why it did not move toward `desired`, in words
    limited_by: str | None = None  # what shortened the move, in words


class Damper:
    """Per-knob recommendation history and the damping rules above. Deterministic: state is only the
    history of (time, recommendation) pairs it was given."""

    def __init__(self, behavior: Behavior) -> None:
        self.behavior = behavior
        self._keep = max(behavior.up.stabilization_window, behavior.down.stabilization_window)
        self._history: dict[str, deque[tuple[float, float]]] = {}

    def recommendations(self, knob: str) -> list[tuple[float, float]]:
        return list(self._history.get(knob, ()))

    def forget(self, knob: str) -> None:
        """Drop a knob's history (after a guardrail rollback the old recommendations are void)."""
        self._history.pop(knob, None)

    def damp(self, knob: str, now: float, current: float, recommended: float, *, lo: float, hi: float,
             tolerance: float = 0.0, urgent: bool = False) -> Damped:
        desired = quantize(knob, recommended, current, lo, hi)
        history = self._history.setdefault(knob, deque())
        history.append((now, desired))
        while history and history[0][0] <= now - self._keep:
            history.popleft()
        if same(desired, current):
            return Damped(current, desired)
        up = desired > current
        direction: Direction = self.behavior.up if up else self.behavior.down
        name = "up" if up else "down"
        target = desired
        if not urgent and direction.stabilization_window > 0:
            seen = [v for t, v in history if t > now - direction.stabilization_window]
            target = min(seen) if up else max(seen)
            if (target <= current + EPS) if up else (target >= current - EPS):
                most = "lowest" if up else "highest"
                return Damped(current, desired, held_by=(
                    f"{name} stabilization window {direction.stabilization_window:g}s: the {most} "
                    f"recommendation in it is {_fmt(target)}"))
        if abs(target - current) < tolerance - EPS:
            return Damped(current, desired, held_by=f"change {_fmt(abs(target - current))} is below "
                                                    f"the tolerance {_fmt(tolerance)}")
        limited = target if urgent else step_limit(knob, current, target, direction.max_step, lo, hi)
        limited = quantize(knob, limited, current, lo, hi)
        limited_by = None
        if not same(limited, target):
            limited_by = f"behavior.{name}.max_step {direction.max_step:g}"
        elif not same(target, desired):
            limited_by = (f"{name} stabilization window {direction.stabilization_window:g}s: "
                          f"the {'lowest' if up else 'highest'} recommendation in it is {_fmt(target)}")
        if same(limited, current):
            return Damped(current, desired, held_by=limited_by or "no change after rounding")
        return Damped(limited, desired, limited_by=limited_by)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"
