"""SampleSeries: a list of samples that is a SampleWindow, for tests and for replay over recorded samples."""

import bisect
from collections.abc import Iterable


class SampleSeries:
    """Samples (dicts with `ts` and metric values, None for no data) kept in ts order.

    `append` takes samples no older than the newest one held (as the sampler produces them), so
    `window` can bisect on time: replaying a day of samples tick by tick stays cheap.
    """

    def __init__(self, samples: Iterable[dict] = ()):
        self._samples: list[dict] = []
        self._ts: list[float] = []
        for sample in sorted(samples, key=_ts):
            self.append(sample)

    def append(self, sample: dict) -> None:
        ts = _ts(sample)
        if self._ts and ts < self._ts[-1]:
            raise ValueError(f"sample ts {ts} is older than the newest sample held ({self._ts[-1]})")
        self._samples.append(sample)
        self._ts.append(ts)

    def __len__(self) -> int:
        return len(self._samples)

    def window(self, metric: str, seconds: float, now: float | None = None) -> list[float]:
        """Values of `metric` with now - seconds < ts <= now, oldest first, None left out."""
        if not self._samples:
            return []
        now = self._ts[-1] if now is None else now
        lo = bisect.bisect_right(self._ts, now - seconds)
        hi = bisect.bisect_right(self._ts, now)
        return [s[metric] for s in self._samples[lo:hi] if s.get(metric) is not None]

    def last(self, metric: str) -> float | None:
        for sample in reversed(self._samples):
            value = sample.get(metric)
            if value is not None:
                return value
        return None

    def samples(self) -> list[dict]:
        return list(self._samples)


def _ts(sample: dict) -> float:
    ts = sample.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValueError(f"a sample needs a numeric 'ts', got {ts!r}")
    return float(ts)
