"""The quality probe job: `engine.probe()` off the event loop, its result fed to the telemetry sampler.

When it runs: once at start (the engine builds its 16-bit reference on the first probe, which it can
only do while the knobs are at 16 bits and uncompressed), every `every_s` seconds (the policy's
`spec.quality_probe_every`, else the config's `telemetry.quality_probe_every_s`; None: never on a
timer), and as soon as `kv_compression` or `weight_bits` differ from the values the latest result was
measured under, whoever changed them (the policy job also calls `request()` right after its own change).

The job is the sampler's `quality` callable: it returns the latest (top1, kl), or None while that result
is stale (the quality knobs moved since) or there is none yet, so no sample ever carries a quality figure
measured under other knobs. A probe that fails with EngineError (the KV cache is full right now) is
skipped and retried after RETRY_S; any other failure is logged and retried at the next period.
The probe itself runs on the engine thread between two steps; here it is awaited in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from optd.engine import Engine, EngineError
from optd.engine.knobs import Knobs

log = logging.getLogger(__name__)

RETRY_S = 10.0
QUALITY_KNOBS = ("kv_compression", "weight_bits")


@dataclass(frozen=True)
class Measured:
    top1: float
    kl: float
    knobs: tuple[float, ...]     # the quality knobs' values it was measured under
    ts: float
    seconds: float


def _quality_knobs(knobs: Knobs) -> tuple[float, ...]:
    return tuple(float(getattr(knobs, name)) for name in QUALITY_KNOBS)


class QualityProbe:
    def __init__(self, engine: Engine, every_s: float | None) -> None:
        self.engine = engine
        self.every_s = every_s
        self.latest: Measured | None = None
        self.runs = self.skipped = self.failed = 0
        self._next = 0.0                  # monotonic time the next probe is due (inf: none scheduled)
        self._last_ok = -math.inf         # monotonic time of the latest successful probe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._inflight: asyncio.Future | None = None

    # -- the sampler's side --

    def __call__(self) -> tuple[float, float] | None:
        """The latest (top1, kl) measured under the quality knobs in force, else None (and a probe is
        asked for, when the knobs moved)."""
        latest = self.latest
        if latest is None:
            return None
        if latest.knobs != _quality_knobs(self.engine.knobs):
            self.request()
            return None
        return latest.top1, latest.kl

    # -- control (callable from any thread) --

    def request(self) -> None:
        """Probe as soon as possible (after a change of a quality knob)."""
        self._on_loop(self._reschedule, 0.0)

    def set_interval(self, every_s: float | None) -> None:
        """A new period (a policy switch), counted from the latest successful probe."""
        self.every_s = every_s          # before start() too: the first period after the start probe
        self._on_loop(self._set_interval, every_s)

    def _on_loop(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _set_interval(self, every_s: float | None) -> None:
        self.every_s = every_s
        if self._inflight is None or self._inflight.done():
            self._reschedule(self._last_ok + self._every() if self.latest is not None else 0.0)

    def _reschedule(self, at: float) -> None:
        self._next = min(self._next, at) if at == 0.0 else at
        if self._changed is not None:
            self._changed.set()

    def _every(self) -> float:
        return self.every_s if self.every_s is not None else math.inf

    # -- the job --

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._next = 0.0            # the first probe at once: the reference needs 16-bit knobs
        self._task = self._loop.create_task(self._run(), name="optd-quality-probe")

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop probing; wait (up to `timeout`) for a probe in flight, so the engine is not shut down
        under it."""
        if self._task is not None:
            self._task.cancel()
        if self._inflight is not None and not self._inflight.done():
            await asyncio.wait({self._inflight}, timeout=timeout)

    async def _run(self) -> None:
        assert self._changed is not None
        while True:
            remaining = self._next - time.monotonic()
            if remaining > 0:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), None if math.isinf(remaining) else remaining)
                continue
            self._next = await self.probe_once()

    async def probe_once(self) -> float:
        """Run one probe now; returns the monotonic time the next one is due."""
        if not self.engine.is_alive():
            return time.monotonic() + RETRY_S
        before = _quality_knobs(self.engine.knobs)
        self._inflight = asyncio.get_running_loop().run_in_executor(None, self.engine.probe)
        try:
            # Shielded: cancelling this job must not abandon the future stop() waits for.
            report = await asyncio.shield(self._inflight)
        except EngineError as e:
            self.skipped += 1
            log.info("quality probe skipped, retrying in %gs: %s", RETRY_S, e)
            return time.monotonic() + RETRY_S
        except Exception:
            self.failed += 1
            log.exception("quality probe failed")
            every = self._every()
            return time.monotonic() + (every if math.isfinite(every) else RETRY_S)
        self.runs += 1
        if _quality_knobs(self.engine.knobs) != before:
            return time.monotonic()     # the knobs moved while it ran: measure again
        self.latest = Measured(report.top1, report.kl, before, time.time(), report.seconds)
        self._last_ok = time.monotonic()
        log.info("quality probe: top1 %.4f, kl %.5f (%d positions, %.2fs)", report.top1, report.kl,
                 report.positions, report.seconds)
        return self._last_ok + self._every()
