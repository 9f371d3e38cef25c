"""The telemetry sampler: one flat sample per interval from engine stats deltas, knobs and device stats.

Sample fields (DESIGN.md, "Telemetry sample and policy format"; seconds, bytes, watts, ratios 0..1):

- `ts`: epoch seconds (time.time()) when the sample was taken.
- `tokens_per_s`, `requests_per_s`, `preemptions_per_s`: deltas of the engine's `generation_tokens_total`,
  `requests_finished_total`, `preemptions_total` over the elapsed monotonic time since the previous
  sample (the first sample: since the Sampler was built, against the counters read then).
- `ttft_p50|p95|p99`, `e2e_p95`: percentiles (linear interpolation) of the TTFT and end-to-end latency
  of the requests that finished in the interval; `itl_p50|p95|p99`: of the inter-token gaps of tokens
  generated in the interval. None when the interval had none.
- `goodput_tokens_per_s`: completion tokens of the requests that finished in the interval with status
  `ok` and met the SLO, divided by the interval. A request meets the SLO when its TTFT <= slo.ttft_p95
  and its mean inter-token gap <= slo.itl_p95 (DistServe's per-request rule; a bound left unset always
  holds, and a request of one token has no gap to check). The requests come from the HTTP layer's
  request log (`optd.daemon.request_log`) through the `finished` callable, typically
  `FinishedBuffer.drain`; without one (a bare engine, no API) goodput is None.
- `requests_running`, `requests_waiting`: gauges; `kv_usage`: kv_blocks_used / kv_blocks_total.
- `acceptance_rate`: accepted / proposed draft tokens in the interval; `acceptance_length`:
  1 + accepted tokens / drafts (tokens per target step of a speculating sequence, vLLM's meaning).
  None when there was no speculation in the interval.
- `quality_top1`, `quality_kl`: from a quality callable when given, else None.
- device: `gpu_memory_used_ratio`, `gpu_util`, `gpu_power_w`, `process_cpu_percent`, `process_rss_bytes`.
- knobs: `spec_length`, `kv_compression`, `weight_bits`, `max_batch_size`.

Every sample carries every key; None means "no data" (store, ring buffer and policies skip it).

With `spec_detail=True` (what `optd serve` uses) a sample also carries what the goodput controller reads
(optd.policies.controllers), beyond DESIGN.md's flat sample; scalars, so the store keeps them and a
replay sees what the live policy saw:
- `spec_accept_pos<j>` for j = 1..max_spec_length: the fraction of the interval's drafts whose first j
  tokens were all accepted, delta(spec_accepted_per_pos[j-1]) / delta(spec_drafts_total); None when
  there were no drafts, or j exceeds the spec_length in force at either end of the interval (those
  positions were not proposed throughout it).
- `step_time_k<k>`: the engine's smoothed decode step time (seconds) at spec_length k, for each k it
  has measured (EngineStats.step_time_s; a gauge, not a delta).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
    JobSubmissionEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from optd.daemon.devices import GPU_FIELDS, PROCESS_FIELDS, DeviceProbe
from optd.daemon.request_log import FinishedRequest
from optd.engine.knobs import Knobs
from optd.engine.outputs import EngineStats
from optd.policies.stats import percentile

log = logging.getLogger(__name__)

LATENCY_FIELDS = ("ttft_p50", "ttft_p95", "ttft_p99", "itl_p50", "itl_p95", "itl_p99", "e2e_p95")
KNOB_FIELDS = tuple(Knobs.names())
SAMPLE_FIELDS = (
    "ts", "tokens_per_s", "goodput_tokens_per_s", "requests_per_s", *LATENCY_FIELDS,
    "requests_running", "requests_waiting", "preemptions_per_s", "kv_usage", "acceptance_rate",
    "acceptance_length", "quality_top1", "quality_kl", *GPU_FIELDS, *PROCESS_FIELDS, *KNOB_FIELDS,
)
ACCEPT_POS_PREFIX, STEP_TIME_PREFIX = "spec_accept_pos", "step_time_k"

Sample = dict[str, float | None]


@dataclass(frozen=True)
class SLO:
    """Latency objectives for goodput, in seconds; None leaves that one unchecked."""

    ttft_p95: float | None = None
    itl_p95: float | None = None

    @classmethod
    def from_config(cls, section: Any) -> SLO:
        """From the daemon config's `slo` section (`ttft_p95_s`, `itl_p95_s`)."""
        return cls(ttft_p95=section.ttft_p95_s, itl_p95=section.itl_p95_s)

    def met(self, ttft: float | None, mean_itl: float | None) -> bool:
        if self.ttft_p95 is not None and (ttft is None or ttft > self.ttft_p95):
            return False
        return self.itl_p95 is None or mean_itl is None or mean_itl <= self.itl_p95

    @property
    def empty(self) -> bool:
        return self.ttft_p95 is None and self.itl_p95 is None


def new_items(prev: Sequence, cur: Sequence) -> list:
    """The items appended to a bounded, oldest-first list between two snapshots `prev` and `cur`.

    The longest suffix of `prev` that is a prefix of `cur` is what both saw; the rest of `cur` is new.
    When nothing overlaps (more was appended than the bound holds) all of `cur` is new, and older new
    items were lost. Latencies are floats from a monotonic clock, so accidental overlaps are not a
    practical concern."""
    prev, cur = list(prev), list(cur)
    for start in range(len(prev) + 1):
        k = len(prev) - start
        if k <= len(cur) and prev[start:] == cur[:k]:
            return cur[k:]
    return cur


class Sampler:
    """Builds one sample per call from the engine's cumulative stats, the knobs and the device.

    `stats` and `knobs` are callables (typically `engine.stats` and `lambda: engine.knobs`); `finished`
    returns the requests finished since its previous call (typically `FinishedBuffer.drain`); `quality`
    optionally returns the latest (top1, kl) or None; `clock` is the monotonic clock used for elapsed
    time (injectable for tests). `slo` may be replaced at any time (a new policy brings its own)."""

    def __init__(self, stats: Callable[[], EngineStats], knobs: Callable[[], Knobs],
                 device: DeviceProbe | None = None, *, slo: SLO | None = None,
                 finished: Callable[[], Iterable[FinishedRequest]] | None = None,
                 quality: Callable[[], tuple[float, float] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, spec_detail: bool = False) -> None:
        self._stats, self._knobs, self._device, self._quality = stats, knobs, device, quality
        self._finished = finished
        self._spec_detail = spec_detail
        self._prev_spec_length: int | None = None
        self.slo = slo or SLO()
        self._clock = clock
        self._last_t = clock()
        try:
            self._prev = stats()
        except Exception:   # the engine is not up yet: count from zero
            log.warning("telemetry: engine stats unavailable at start, counting from zero", exc_info=True)
            self._prev = EngineStats()

    def sample(self, now: float | None = None) -> Sample:
        """One sample; `now` is its epoch timestamp (default time.time())."""
        ts = time.time() if now is None else now
        t = self._clock()
        cur = self._stats()
        prev, self._prev = self._prev, cur
        elapsed, self._last_t = t - self._last_t, t

        def delta(name: str) -> int:
            return max(getattr(cur, name) - getattr(prev, name), 0)   # an engine restart resets counters

        def rate(name: str) -> float | None:
            return delta(name) / elapsed if elapsed > 0 else None

        ttft = new_items(prev.ttft_s, cur.ttft_s)
        e2e = new_items(prev.e2e_s, cur.e2e_s)
        itl = new_items(prev.itl_s, cur.itl_s)
        drafts, proposed = delta("spec_drafts_total"), delta("spec_draft_tokens_total")
        accepted = delta("spec_accepted_tokens_total")
        tokens_per_s = rate("generation_tokens_total")
        knobs = self._knobs()

        out: Sample = {
            "ts": ts,
            "tokens_per_s": tokens_per_s,
            "goodput_tokens_per_s": self._goodput(elapsed),
            "requests_per_s": rate("requests_finished_total"),
            "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
            "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p95": percentile(itl, 95), "itl_p99": percentile(itl, 99),
            "e2e_p95": percentile(e2e, 95),
            "requests_running": float(cur.requests_running),
            "requests_waiting": float(cur.requests_waiting),
            "preemptions_per_s": rate("preemptions_total"),
            "kv_usage": cur.kv_blocks_used / cur.kv_blocks_total if cur.kv_blocks_total else None,
            "acceptance_rate": accepted / proposed if proposed else None,
            "acceptance_length": 1.0 + accepted / drafts if drafts else None,
            "quality_top1": None, "quality_kl": None,
        }
        if self._quality is not None:
            try:
                q = self._quality()
            except Exception:
                log.exception("telemetry: quality source failed")
                q = None
            if q is not None:
                out["quality_top1"], out["quality_kl"] = float(q[0]), float(q[1])
        out.update(dict.fromkeys((*GPU_FIELDS, *PROCESS_FIELDS)))
        if self._device is not None:
            out.update(self._device.read())
        out.update({name: float(getattr(knobs, name)) for name in KNOB_FIELDS})
        if self._spec_detail:
            k_prev = knobs.spec_length if self._prev_spec_length is None else self._prev_spec_length
            out.update(spec_detail(prev, cur, drafts, min(k_prev, knobs.spec_length)))
        self._prev_spec_length = knobs.spec_length
        return out

    def _goodput(self, elapsed: float) -> float | None:
        if self._finished is None:
            return None
        finished = self._finished()      # drained even when elapsed is 0: they belong to no later interval
        if elapsed <= 0:
            return None
        good = sum(r.completion_tokens for r in finished
                   if r.status == "ok" and self.slo.met(r.ttft_s, r.itl_mean_s))
        return good / elapsed


def spec_detail(prev: EngineStats, cur: EngineStats, drafts: int, proposed_to: int) -> Sample:
    """The goodput controller's extra sample keys (see the module docstring): per-position acceptance
    over the interval for positions 1..`proposed_to`, and the step time per spec_length."""
    out: Sample = {}
    before, after = prev.spec_accepted_per_pos, cur.spec_accepted_per_pos
    for j in range(1, len(after) + 1):
        ok = drafts > 0 and j <= proposed_to and j <= len(before)
        out[f"{ACCEPT_POS_PREFIX}{j}"] = max(after[j - 1] - before[j - 1], 0) / drafts if ok else None
    for k, seconds in sorted(cur.step_time_s.items()):
        out[f"{STEP_TIME_PREFIX}{k}"] = float(seconds)
    return out


class RingBuffer:
    """The last `seconds` of samples (bounded by count: seconds / interval, plus slack), for policy windows.

    Callable: pass it to TelemetryJob as a subscriber."""

    def __init__(self, seconds: float, interval: float) -> None:
        if not (seconds > 0 and interval > 0):
            raise ValueError(f"seconds and interval must be > 0, got {seconds!r}, {interval!r}")
        self.seconds = seconds
        self._samples: deque[Sample] = deque(maxlen=math.ceil(seconds / interval) + 2)

    def __call__(self, sample: Sample) -> None:
        self.append(sample)

    def __len__(self) -> int:
        return len(self._samples)

    def append(self, sample: Sample) -> None:
        self._samples.append(dict(sample))

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def window(self, metric: str, seconds: float, now: float | None = None) -> list[float]:
        """Values of `metric` in samples with now - seconds < ts <= now, oldest first; samples where it
        is None or missing are left out. `now` defaults to the newest sample's ts."""
        if not self._samples:
            return []
        now = self._samples[-1]["ts"] if now is None else now
        out = []
        for s in reversed(self._samples):
            ts = s["ts"]
            if ts <= now - seconds:
                break
            if ts <= now and (v := s.get(metric)) is not None:
                out.append(v)
        out.reverse()
        return out

    def last(self, metric: str) -> float | None:
        """The newest value of `metric` that is not None (quality, for one, is measured now and then)."""
        for s in reversed(self._samples):
            if (v := s.get(metric)) is not None:
                return v
        return None


Subscriber = Callable[[Sample], Any]


class TelemetryJob:
    """Runs `sampler.sample()` every `interval_s` on an APScheduler 3 AsyncIOScheduler and hands each
    sample to every subscriber, in order; one that raises is logged and the others still get it.

    The job runs on the event loop (sampling reads counters and NVML, no GPU work). Runs that could not
    happen are counted: `lost` (every scheduled run time that produced no sample, measured as the gap
    since the previous run in intervals, minus one: it includes run times folded into one by
    coalesce=True after the loop was blocked, and those below), `missed` (APScheduler's
    EVENT_JOB_MISSED: the run would have started later than `misfire_grace_time`), `skipped`
    (EVENT_JOB_MAX_INSTANCES: the previous run was still going), `errors` (the sampler raised) and
    `subscriber_errors`.

    APScheduler 3 takes `misfire_grace_time` in whole seconds (default here: the interval rounded up).
    With coalesce=True only the newest overdue run time is checked against it, so for intervals of
    a second or less a blocked loop shows in `lost`, not in `missed`."""

    JOB_ID = "optd-telemetry"

    def __init__(self, sampler: Sampler, interval_s: float = 1.0,
                 subscribers: Iterable[Subscriber] = (), *, misfire_grace_time: int | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.sampler = sampler
        self.interval_s = interval_s
        self.subscribers: list[Subscriber] = list(subscribers)
        grace = math.ceil(interval_s) if misfire_grace_time is None else misfire_grace_time
        if not (isinstance(grace, int) and grace > 0):
            raise ValueError(f"misfire_grace_time must be a positive whole number of seconds, got {grace!r}")
        self.misfire_grace_time = grace
        self.runs = self.missed = self.skipped = self.lost = self.errors = self.subscriber_errors = 0
        self.last_sample: Sample | None = None
        self._last_run: float | None = None
        self.scheduler: AsyncIOScheduler | None = None

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start sampling; call from the running event loop (or pass it)."""
        if self.scheduler is not None:
            raise RuntimeError("telemetry job already started")
        loop = loop or asyncio.get_running_loop()
        self.scheduler = AsyncIOScheduler(event_loop=loop, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": self.misfire_grace_time,
        })
        self.scheduler.add_listener(self._on_event,
                                    EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR)
        self.scheduler.add_job(self.run_once, "interval", seconds=self.interval_s, id=self.JOB_ID,
                               name="telemetry sampler")
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None

    def _on_event(self, event: JobExecutionEvent | JobSubmissionEvent) -> None:
        if event.job_id != self.JOB_ID:
            return
        if event.code == EVENT_JOB_MISSED:
            self.missed += 1
            log.warning("telemetry: run due at %s missed (later than %ds)", event.scheduled_run_time,
                        self.misfire_grace_time)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            self.skipped += 1
            log.warning("telemetry: run skipped, the previous one is still running")
        elif event.code == EVENT_JOB_ERROR:
            log.error("telemetry: job failed: %r", event.exception)

    async def run_once(self) -> Sample | None:
        """Take one sample and fan it out (what the scheduler runs; callable directly)."""
        t = time.monotonic()
        if self._last_run is not None:
            lost = round((t - self._last_run) / self.interval_s) - 1
            if lost > 0:
                self.lost += lost
                log.warning("telemetry: %d run(s) lost to a blocked event loop (%.2fs since the last)",
                            lost, t - self._last_run)
        self._last_run = t
        self.runs += 1
        try:
            sample = self.sampler.sample()
        except Exception:
            self.errors += 1
            log.exception("telemetry: sampling failed")
            return None
        self.last_sample = sample
        for subscriber in list(self.subscribers):
            try:
                subscriber(sample)
            except Exception:
                self.subscriber_errors += 1
                log.exception("telemetry: subscriber %r failed", subscriber)
        return sample
