"""Durations as policies write them: "800ms", "30s", "5m", "1h", "1.5s", or a bare number of seconds."""

import math
import re

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A non-negative decimal number directly followed by a unit; no sign, no exponent, no spaces inside.
DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")


def parse_duration(value: object) -> float:
    """Seconds as a float. Negative, infinite, NaN, boolean and malformed values raise ValueError."""
    if isinstance(value, bool):  # YAML's yes/no/true would otherwise pass as 1 or 0
        raise ValueError(f"expected a duration like 800ms, 30s, 5m or 1h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        match = DURATION_RE.fullmatch(text)
        if match:
            seconds = float(match.group(1)) * UNITS[match.group(2)]
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"expected a duration like 800ms, 30s, 5m or 1h, got {value!r}") from None
            if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", text):  # no "1e3", "inf", "+5"
                raise ValueError(f"expected a duration like 800ms, 30s, 5m or 1h, got {value!r}")
    else:
        raise ValueError(f"expected a duration like 800ms, 30s, 5m or 1h, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds
