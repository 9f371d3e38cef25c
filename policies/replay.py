"""Replay: evaluate a policy over recorded samples and return the decisions it would have made.

No engine, no clock, no store: the caller hands in samples (flat dicts with `ts`, as the daemon's
sampler produced them and the store kept them) in time order. A fresh PolicyEvaluator sees them the way
the daemon's policy job sees its ring buffer:
- a window over the last `history_s` seconds of samples (the daemon's telemetry.ring_buffer_s);
- a tick every `spec.evaluate_every` seconds of sample time, on a grid starting at the first sample,
  evaluated at the first sample at or after each grid point (with that sample's ts as `now`);
- the knobs in force are the newest sample's knob fields (the values the live daemon had, not those the
  replayed decisions would have set: nothing is applied), no pins, not paused, no knob unsupported;
- every decision is handed back through `record_outcome` as it stands (an "applied" one counts as
  applied, since the live engine's answer is unknown).

Same policy, same samples, same bounds: same decisions, run after run.
"""

import bisect
import math
from collections.abc import Iterable, Iterator

from optd.engine.knobs import Knobs
from optd.policies.decision import Decision
from optd.policies.evaluator import KnobBounds, PolicyEvaluator
from optd.policies.loader import LoadedPolicy
from optd.policies.metrics import KNOB_NAMES

DEFAULT_HISTORY_S = 3600.0
INTEGER_KNOBS = frozenset({"spec_length", "max_batch_size"})


class BoundedWindow:
    """A SampleWindow over the samples of the last `seconds` (relative to the newest appended), like
    the daemon's ring buffer. Samples must be appended in ts order."""

    def __init__(self, seconds: float = DEFAULT_HISTORY_S) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        self.seconds = seconds
        self._samples: list[dict] = []
        self._ts: list[float] = []
        self._start = 0                 # samples before this index have aged out

    def append(self, sample: dict) -> None:
        ts = float(sample["ts"])
        if self._ts and ts < self._ts[-1]:
            raise ValueError(f"sample ts {ts} is older than the newest sample held ({self._ts[-1]})")
        self._samples.append(sample)
        self._ts.append(ts)
        self._start = bisect.bisect_right(self._ts, ts - self.seconds, lo=self._start)
        if self._start > 4096 and self._start * 2 > len(self._ts):   # compact now and then: O(1) amortized
            del self._samples[:self._start], self._ts[:self._start]
            self._start = 0

    def __len__(self) -> int:
        return len(self._ts) - self._start

    def window(self, metric: str, seconds: float, now: float | None = None) -> list[float]:
        if len(self) == 0:
            return []
        now = self._ts[-1] if now is None else now
        lo = bisect.bisect_right(self._ts, now - seconds, lo=self._start)
        hi = bisect.bisect_right(self._ts, now, lo=lo)
        return [v for s in self._samples[lo:hi] if (v := s.get(metric)) is not None]

    def last(self, metric: str) -> float | None:
        for i in range(len(self._samples) - 1, self._start - 1, -1):
            if (v := self._samples[i].get(metric)) is not None:
                return v
        return None

    def samples(self) -> list[dict]:
        return self._samples[self._start:]


def knobs_of(sample: dict, previous: Knobs) -> Knobs:
    """The knobs a sample recorded; a knob it lacks (or holds None for) keeps its previous value."""
    values = {}
    for name in KNOB_NAMES:
        v = sample.get(name)
        if v is None or not isinstance(v, int | float) or not math.isfinite(v):
            values[name] = getattr(previous, name)
        else:
            values[name] = round(v) if name in INTEGER_KNOBS else float(v)
    return Knobs(**values)


def replay(loaded: LoadedPolicy, samples: Iterable[dict], *, knob_bounds: KnobBounds | None = None,
           history_s: float = DEFAULT_HISTORY_S) -> Iterator[Decision]:
    """The decisions `loaded` would have made over `samples` (ts order), tick by tick."""
    evaluator = PolicyEvaluator(loaded, knob_bounds)
    window = BoundedWindow(history_s)
    every = loaded.policy.spec.evaluate_every
    knobs = Knobs()
    start: float | None = None
    due = -math.inf
    for sample in samples:
        window.append(sample)
        knobs = knobs_of(sample, knobs)
        ts = float(sample["ts"])
        if start is None:
            start = ts
        if ts < due:
            continue
        for decision in evaluator.evaluate(window, knobs, ts):
            evaluator.record_outcome(decision)
            yield decision
        due = start + (math.floor((ts - start) / every) + 1) * every


def table(decisions: list[Decision]) -> str:
    """One line per decision (time UTC, knob old -> new, outcome, source, reason)."""
    return "\n".join(d.summary() for d in decisions)
