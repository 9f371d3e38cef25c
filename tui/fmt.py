"""Numbers for people: latencies, ages, ratios and knob values, short enough for an 80-column screen."""

from __future__ import annotations

import math
import time

DASH = "—"


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def seconds(value: float | None) -> str:
    """A latency: 850µs, 19ms, 1.25s."""
    if _missing(value):
        return DASH
    if value < 1e-3:
        return f"{value * 1e6:.0f}µs"
    if value < 1:
        return f"{value * 1e3:.0f}ms"
    return f"{value:.2f}s"


def age(value: float | None) -> str:
    """How long ago or how long left: 5s, 3m, 2h, 4d."""
    if _missing(value):
        return DASH
    value = max(0.0, value)
    for limit, unit, size in ((60, "s", 1), (3600, "m", 60), (86400, "h", 3600)):
        if value < limit:
            return f"{value / size:.0f}{unit}"
    return f"{value / 86400:.0f}d"


def ratio(value: float | None) -> str:
    return DASH if _missing(value) else f"{value * 100:.0f}%"


def number(value: float | None, digits: int = 1) -> str:
    if _missing(value):
        return DASH
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:.{digits}f}"


def knob(value: object) -> str:
    """A knob value as the API has it: 4, 0.5, 16."""
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def clock(ts: float) -> str:
    """A wall-clock time of day (local): 14:03:27."""
    return time.strftime("%H:%M:%S", time.localtime(ts))
