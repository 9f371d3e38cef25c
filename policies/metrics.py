"""What policies can read: the telemetry sample's metric names (DESIGN.md) and a window over samples.

The daemon's sampler produces these fields (optd.daemon.telemetry.SAMPLE_FIELDS, plus `ts`); policy
expressions and controllers may name nothing else. `SampleWindow` is what a policy evaluates against:
the daemon's live ring buffer implements it, and so does a replay over samples read from the store.
"""

from typing import Protocol

from optd.engine.knobs import Knobs

KNOB_NAMES = tuple(Knobs.names())
LATENCY_METRICS = ("ttft_p50", "ttft_p95", "ttft_p99", "itl_p50", "itl_p95", "itl_p99", "e2e_p95")
METRIC_NAMES = (
    "tokens_per_s", "goodput_tokens_per_s", "requests_per_s", *LATENCY_METRICS,
    "requests_running", "requests_waiting", "preemptions_per_s", "kv_usage", "acceptance_rate",
    "acceptance_length", "quality_top1", "quality_kl", "gpu_memory_used_ratio", "gpu_util",
    "gpu_power_w", "process_cpu_percent", "process_rss_bytes", *KNOB_NAMES,
)


class SampleWindow(Protocol):
    """Samples are flat dicts with `ts` (epoch seconds) and the metrics above; None means no data."""

    def window(self, metric: str, seconds: float, now: float | None = None) -> list[float]:
        """Values of `metric` with now - seconds < ts <= now, oldest first, None values left out;
        `now` defaults to the newest sample's ts."""
        ...

    def last(self, metric: str) -> float | None:
        """The newest value of `metric` that is not None."""
        ...

    def samples(self) -> list[dict[str, float | None]]:
        """All samples held, oldest first."""
        ...
