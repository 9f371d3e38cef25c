"""Prometheus metrics of the daemon, served at `GET /metrics`.

One `Metrics` object owns its own `CollectorRegistry` (never the global one), so several daemons or
tests in one process do not collide. It is fed by the daemon:

- `update_engine(stats, knobs)` with the latest `EngineStats` snapshot and the knobs in force;
- `update_sample(sample)` with the latest telemetry sample (the flat dict of DESIGN.md);
- `observe_request(ttft_s, itl_s, e2e_s)` once per finished request (latency histograms);
- `record_decision(knob, outcome)` once per policy or operator decision;
- the MQTT bridge increments `mqtt_sent`, `mqtt_dropped` (by kind) and `mqtt_commands` (by outcome)
  and sets `mqtt_connected`;

and `render(accept)` returns the exposition body and its content type for the HTTP layer.

Naming: prefix `optd_`, base units (seconds, bytes, watts, ratios 0..1), counters end in `_total`.

Counters mirroring the engine's monotonic totals are not kept here: a collector reads them from the
latest `EngineStats` snapshot at scrape time, so they always equal the engine's own figures (a new
engine in the same process starts again from 0, which Prometheus treats as a counter reset).

Knobs are exported as four gauges (`optd_knob_spec_length`, `optd_knob_kv_compression`,
`optd_knob_weight_bits`, `optd_knob_max_batch_size`) rather than one `optd_knob{knob=...}` gauge:
their units differ (tokens, ratio, bits, sequences) and one metric name should carry one unit.

Gauges that both sources know (queue lengths, `optd_kv_usage_ratio`, the knobs) take the value of
whichever update came last. A gauge whose value is unknown — never set, or absent / None / NaN in
the latest sample (quality on a CPU without a probe run, device power without NVML) — is not exported
at all rather than exported as NaN, so `absent(...)` alerts work and dashboards show "no data".
"""

from __future__ import annotations

import math
import platform
import threading
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from optd.engine import EngineStats, Knobs

PREFIX = "optd_"

# Latency buckets (seconds), chosen around the balanced preset's SLOs (ttft_p95 800 ms, itl_p95 60 ms)
# so the fraction of requests within the SLO can be read off a bucket boundary.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8,
                1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
               90.0, 120.0, 300.0, 600.0)

# Counters read from EngineStats at scrape time: metric name (without `_total`) -> (field, help).
ENGINE_COUNTERS: dict[str, tuple[str, str]] = {
    "optd_requests_finished": ("requests_finished_total", "Requests finished (any finish reason)."),
    "optd_prompt_tokens": ("prompt_tokens_total", "Prompt tokens prefilled."),
    "optd_generation_tokens": ("generation_tokens_total", "Tokens generated."),
    "optd_preemptions": ("preemptions_total", "Sequences preempted for lack of KV-cache blocks."),
    "optd_steps": ("steps_total", "Engine steps run."),
    "optd_spec_drafts": ("spec_drafts_total", "Speculative drafts verified (one per sequence and step)."),
    "optd_spec_draft_tokens": ("spec_draft_tokens_total", "Draft tokens proposed."),
    "optd_spec_accepted_tokens": ("spec_accepted_tokens_total", "Draft tokens accepted."),
}

# Gauges read from EngineStats: metric name -> (field, help).
ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "optd_requests_running": ("requests_running", "Requests being decoded."),
    "optd_requests_waiting": ("requests_waiting", "Requests queued, waiting for a batch slot."),
    "optd_kv_blocks_used": ("kv_blocks_used", "KV-cache blocks in use."),
    "optd_kv_blocks_total": ("kv_blocks_total", "KV-cache blocks in the pool."),
    "optd_kv_bytes_per_token": ("kv_bytes_per_token", "KV-cache bytes per token (all layers)."),
    "optd_kv_compression_achieved_ratio": ("kv_compression_achieved",
                                           "KV bytes per token saved relative to the 16-bit cache."),
    "optd_weight_bytes": ("weight_bytes", "Bytes of the linear layers' weights."),
}

KNOB_GAUGES: dict[str, tuple[str, str]] = {
    "optd_knob_spec_length": ("spec_length", "Knob: draft tokens proposed per step (0 = off)."),
    "optd_knob_kv_compression": ("kv_compression", "Knob: KV-cache compression ratio requested."),
    "optd_knob_weight_bits": ("weight_bits", "Knob: average bits per weight of the linear layers."),
    "optd_knob_max_batch_size": ("max_batch_size", "Knob: sequences decoded concurrently."),
}

# Gauges read from the telemetry sample: metric name -> (sample field, help).
SAMPLE_GAUGES: dict[str, tuple[str, str]] = {
    "optd_requests_running": ("requests_running", ENGINE_GAUGES["optd_requests_running"][1]),
    "optd_requests_waiting": ("requests_waiting", ENGINE_GAUGES["optd_requests_waiting"][1]),
    "optd_kv_usage_ratio": ("kv_usage", "Fraction of KV-cache blocks in use."),
    "optd_spec_acceptance_rate": ("acceptance_rate", "Fraction of draft tokens accepted (recent)."),
    "optd_spec_acceptance_length": ("acceptance_length", "Tokens emitted per speculative step (recent)."),
    "optd_quality_top1": ("quality_top1", "Quality probe: argmax agreement with the reference, 0..1."),
    "optd_quality_kl": ("quality_kl", "Quality probe: mean KL(reference || current), nats."),
    "optd_gpu_memory_used_ratio": ("gpu_memory_used_ratio", "Fraction of device memory in use."),
    "optd_gpu_utilization_ratio": ("gpu_util", "Device utilization, 0..1."),
    "optd_gpu_power_watts": ("gpu_power_w", "Device power draw, watts."),
    **{name: (field, help_) for name, (field, help_) in KNOB_GAUGES.items()},
}

GAUGE_HELP: dict[str, str] = {name: help_ for table in (ENGINE_GAUGES, KNOB_GAUGES, SAMPLE_GAUGES)
                              for name, (_, help_) in table.items()}

# Decision outcomes pre-created at 0 for every knob, so rate() and increase() work from the first scrape.
DECISION_OUTCOMES = ("applied", "rejected", "rolled_back")


def _number(value: object) -> float | None:
    """`value` as a finite float, or None when it is missing or not a usable number."""
    if value is None:
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


class _StateCollector(Collector):
    """Exports the engine counters, the gauges and build info from `Metrics`' state at scrape time."""

    def __init__(self, owner: Metrics):
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        # Fixed names, so the registry can detect a clash with the histograms and counters.
        yield from self._families(None, {}, {}, {})

    def collect(self) -> Iterable[Metric]:
        o = self._owner
        with o._lock:
            stats, gauges, build = o._stats, dict(o._gauges), dict(o._build)
            step_time = dict(stats.step_time_s) if stats is not None else {}
        return self._families(stats, gauges, build, step_time)

    def _families(self, stats: EngineStats | None, gauges: Mapping[str, float],
                  build: Mapping[str, str], step_time: Mapping[int, float]) -> Iterator[Metric]:
        describing = stats is None and not build
        if stats is not None or describing:
            for name, (field, help_) in ENGINE_COUNTERS.items():
                fam = CounterMetricFamily(name, help_)
                if stats is not None:
                    fam.add_metric([], getattr(stats, field))
                yield fam
            fam = CounterMetricFamily("optd_spec_accepted_tokens_by_position",
                                      "Draft tokens accepted, by position in the draft (1 = first).",
                                      labels=["position"])
            for i, n in enumerate(stats.spec_accepted_per_pos if stats is not None else ()):
                fam.add_metric([str(i + 1)], n)
            yield fam
            fam = GaugeMetricFamily("optd_decode_step_seconds",
                                    "Smoothed decode step time, by spec_length in force.",
                                    labels=["spec_length"])
            for k, seconds in sorted(step_time.items()):
                fam.add_metric([str(k)], seconds)
            yield fam
        for name in sorted(GAUGE_HELP):
            if name in gauges or describing:
                fam = GaugeMetricFamily(name, GAUGE_HELP[name])
                if name in gauges:
                    fam.add_metric([], gauges[name])
                yield fam
        fam = GaugeMetricFamily("optd_build_info", "Build and runtime information; always 1.",
                                labels=list(build) or ["version", "python", "torch", "device"])
        if build:
            fam.add_metric(list(build.values()), 1)
        yield fam


class Metrics:
    """The daemon's Prometheus metrics, in a registry of their own. Thread-safe."""

    def __init__(self, *, device: str = "unknown", version: str | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._stats: EngineStats | None = None
        self._gauges: dict[str, float] = {}
        if version is None:
            from optd import __version__ as version
        self._build = {"version": version, "python": platform.python_version(),
                       "torch": _package_version("torch"), "device": device}
        self.registry.register(_StateCollector(self))

        self.ttft = Histogram("optd_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("optd_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("optd_e2e_request_latency_seconds",
                             "Time from arrival to the request's last token.",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.decisions = Counter("optd_decisions", "Knob decisions, by knob and outcome.",
                                 labelnames=["knob", "outcome"], registry=self.registry)
        from optd.engine.knobs import Knobs
        for knob in Knobs.names():
            for outcome in DECISION_OUTCOMES:
                self.decisions.labels(knob=knob, outcome=outcome)
        # The MQTT bridge's (optd.daemon.mqtt); its label sets appear once the bridge starts.
        self.mqtt_sent = Counter("optd_mqtt_messages_sent", "MQTT messages published, by topic kind.",
                                 labelnames=["kind"], registry=self.registry)
        self.mqtt_dropped = Counter("optd_mqtt_messages_dropped",
                                    "MQTT messages discarded unsent (outgoing queue full, or lost with "
                                    "the connection), by topic kind.", labelnames=["kind"],
                                    registry=self.registry)
        self.mqtt_commands = Counter("optd_mqtt_commands", "MQTT commands, by outcome (ok, refused).",
                                     labelnames=["outcome"], registry=self.registry)
        self.mqtt_connected = Gauge("optd_mqtt_connected", "1 while the MQTT bridge is connected.",
                                    labelnames=["node"], registry=self.registry)

    # -- feeding -------------------------------------------------------------------------------------

    def set_device(self, device: str) -> None:
        """The `device` label of `optd_build_info` (known once the engine has picked its device)."""
        with self._lock:
            self._build["device"] = str(device)

    def update_engine(self, stats: EngineStats, knobs: Knobs | None = None) -> None:
        """Take the latest engine snapshot (counters, queue, KV) and the knobs in force."""
        values: dict[str, float] = {}
        for name, (field, _) in ENGINE_GAUGES.items():
            x = _number(getattr(stats, field, None))
            if x is not None:
                values[name] = x
        if stats.kv_blocks_total > 0:
            values["optd_kv_usage_ratio"] = stats.kv_blocks_used / stats.kv_blocks_total
        if knobs is not None:
            for name, (field, _) in KNOB_GAUGES.items():
                x = _number(getattr(knobs, field, None))
                if x is not None:
                    values[name] = x
        with self._lock:
            self._stats = stats
            self._gauges.update(values)

    def update_sample(self, sample: Mapping[str, object]) -> None:
        """Take the latest telemetry sample; a field it lacks (or holds None/NaN) is not exported,
        except for gauges the engine snapshot also sets, which keep the engine's value."""
        engine_names = set(ENGINE_GAUGES) | set(KNOB_GAUGES) | {"optd_kv_usage_ratio"}
        with self._lock:
            for name, (field, _) in SAMPLE_GAUGES.items():
                x = _number(sample.get(field))
                if x is not None:
                    self._gauges[name] = x
                elif name not in engine_names:
                    self._gauges.pop(name, None)

    def observe_request(self, ttft_s: float | None, itl_s: Iterable[float] | None,
                        e2e_s: float | None) -> None:
        """Record one finished request's latencies (seconds); missing or non-finite values are skipped
        (a request aborted before its first token has no TTFT)."""
        x = _number(ttft_s)
        if x is not None:
            self.ttft.observe(x)
        for gap in itl_s or ():
            x = _number(gap)
            if x is not None:
                self.itl.observe(x)
        x = _number(e2e_s)
        if x is not None:
            self.e2e.observe(x)

    def record_decision(self, knob: str, outcome: str, count: int = 1) -> None:
        """Count a decision on `knob` with `outcome` (applied, rejected, rolled_back, or another word
        the policy engine uses, e.g. observed in observe mode)."""
        self.decisions.labels(knob=str(knob), outcome=str(outcome)).inc(count)

    # -- exposition ----------------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type; the Prometheus text format unless the `Accept`
        header asks for OpenMetrics."""
        if accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
