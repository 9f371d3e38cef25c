"""The policy job: every `spec.evaluate_every`, evaluate the running policy and actuate its decisions.

One tick (in a worker thread, never on the event loop; under the control API's knob-write lock, so a
pin cannot slip in between reading the pins and applying a change):
1. read the pins and the paused flag from the store and the knobs from the engine;
2. `PolicyEvaluator.evaluate` over the telemetry ring buffer (optd.policies.evaluator);
3. for each decision with outcome "applied", `engine.apply` the new value; the engine's answer rewrites
   the outcome ("rejected" with its reason, "rolled_back" after a fault, which the engine undid) and
   the cost; then `evaluator.record_outcome(decision)` so damping and guardrails know what happened;
4. every decision, whatever its outcome, is recorded through `ControlRoutes._record` (decisions
   table with its inputs, reason, source, policy and mode; the Prometheus counter by knob and outcome),
   committed once per tick, and published on the event stream as "decision".

A knob the engine refuses even at its current value is unsupported: after its first refusal it is
passed to the evaluator as `unsupported`, which reports it once and skips it from then on. (This engine
turns all four knobs, and the envelope keeps spec_length at 0 without a drafter, so today nothing
reaches it; it guards engines that lack a knob.)

Without a policy nothing is scheduled and the knobs stay where config and pins put them. A policy
becomes active at start (config `policy:` / `optd serve --policy`), by `PUT /v1/control/policy`
(`switch_request`) or on SIGHUP (`reload`); each one that becomes active is stored in
policy_versions (the store keeps one active row) and announced to the listeners (the sampler's SLO,
the quality probe's period) and on the event stream as "policy". Scheduling is APScheduler 3 with
explicit job defaults; runs that could not happen are counted in `missed` (later than the grace
time), `skipped` (the previous tick still running) and `lost` (run times folded into one after the
loop was blocked), and ticks that raised in `errors`.

Over the API a policy is accepted by name (a preset or search-path name, or the configured policy's
reference or name) or as a YAML document, never as a file path: a filesystem path from the network
would let any token holder make the daemon read its files.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from optd.daemon.telemetry import SLO
from optd.policies.damping import INTEGER_KNOBS
from optd.policies.decision import Decision
from optd.policies.errors import PolicyError
from optd.policies.evaluator import PolicyEvaluator
from optd.policies.loader import LoadedPolicy, load_policy, parse_policy
from optd.policies.metrics import SampleWindow

if TYPE_CHECKING:
    from optd.daemon.control_api import ControlRoutes
    from optd.daemon.quality_probe import QualityProbe

log = logging.getLogger(__name__)

# A policy name as the API accepts it: what presets and search-path files are called, nothing path-like.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
QUALITY_KNOBS = frozenset({"kv_compression", "weight_bits"})
TEXT_SOURCE = "PUT /v1/control/policy"


@dataclass(frozen=True)
class ActivePolicy:
    loaded: LoadedPolicy
    evaluator: PolicyEvaluator
    origin: str                  # "config" (at start), "api" (PUT policy), "reload" (SIGHUP)
    version_id: int | None       # its policy_versions row
    since: float                 # epoch seconds it became active

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def mode(self) -> str:
        return self.loaded.policy.spec.mode

    @property
    def source(self) -> str:
        return TEXT_SOURCE if self.loaded.source == "<text>" else self.loaded.source

    @property
    def evaluate_every(self) -> float:
        return self.loaded.policy.spec.evaluate_every


Listener = Callable[[ActivePolicy | None], None]


def slo_for(active: ActivePolicy | None, fallback: SLO) -> SLO:
    """The goodput SLO while `active` runs: the policy's bounds where it sets them, else `fallback`'s
    (the config's `slo:`)."""
    if active is None:
        return fallback
    slo = active.loaded.policy.spec.slo
    return SLO(ttft_p95=slo.ttft_p95 if slo.ttft_p95 is not None else fallback.ttft_p95,
               itl_p95=slo.itl_p95 if slo.itl_p95 is not None else fallback.itl_p95)


def envelope(max_num_seqs: int, max_spec_length: int, has_drafter: bool
             ) -> dict[str, tuple[float | None, float | None]]:
    """The engine's envelope as the evaluator's knob bounds: the policy moves knobs only inside it."""
    spec_hi = max_spec_length if has_drafter else 0     # no drafter: no speculation
    return {"max_batch_size": (1, max_num_seqs), "spec_length": (0, spec_hi)}


def check_name(ref: Any, path: str) -> str:
    """`ref` if it is a plain policy name, else a PolicyError at `path` (a path or anything else)."""
    if not isinstance(ref, str) or not NAME_RE.fullmatch(ref):
        raise PolicyError(f"{ref!r} is not a policy name: over the API only names (letters, digits, '-', "
                          "'_') of presets or files in the policy search path are accepted, never file paths",
                          path)
    # The loader reads a name that is also a file in the working directory as that file.
    if Path(ref).exists():
        raise PolicyError(f"{ref!r} is also a file in the daemon's working directory; refusing it over "
                          "the API", path)
    return ref


def _typed(knob: str, value: float | None) -> float | int | None:
    """A knob value as the engine and the decisions table want it: integers for integer knobs."""
    if value is None:
        return None
    return round(value) if knob in INTEGER_KNOBS else float(value)


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class PolicyJob:
    JOB_ID = "optd-policy"

    def __init__(self, control: ControlRoutes, window: SampleWindow, *, configured: str | None = None,
                 search_path: list[Path] | None = None, listeners: Iterable[Listener] = (),
                 quality: QualityProbe | None = None) -> None:
        self.control, self.engine, self.store, self.hub = control, control.engine, control.store, control.hub
        self.window = window
        self.search_path = search_path
        self.listeners: list[Listener] = list(listeners)
        self.quality = quality
        # The config's `policy:` reference, and the effective YAML and name it had when last loaded: a
        # SIGHUP switches policy only when these changed, so a policy PUT since survives an idle reload.
        self.configured = configured
        self.configured_text: str | None = None
        self.configured_name: str | None = None
        self.active: ActivePolicy | None = None
        self.unsupported: set[str] = set()
        self.runs = self.missed = self.skipped = self.lost = self.errors = 0
        self.decisions = 0
        self._lock = threading.Lock()           # one tick or switch at a time: the evaluator's state
        self.scheduler: AsyncIOScheduler | None = None
        self._inflight: asyncio.Future | None = None
        self._last_run: float | None = None

    def knob_bounds(self) -> dict[str, tuple[float | None, float | None]]:
        cfg = self.engine.config
        return envelope(cfg.max_num_seqs, cfg.max_spec_length, cfg.draft_model is not None)

    # -- loading ------------------------------------------------------------------------------------

    def load_configured(self) -> LoadedPolicy:
        """Load the configured policy (blocking; raises PolicyError) and remember what it was."""
        assert self.configured is not None
        loaded = load_policy(self.configured, self.search_path)
        self.configured_text, self.configured_name = loaded.text, loaded.name
        return loaded

    def activate_configured(self, loaded: LoadedPolicy) -> ActivePolicy:
        """At start: `loaded` is the configured policy (loaded before the engine); make it active."""
        self.configured_text, self.configured_name = loaded.text, loaded.name
        return self.activate(loaded, "config")

    def load_named(self, name: str) -> LoadedPolicy:
        """A policy named over the API: the configured one (by its reference or its name), else a plain
        name looked up in the search path and the presets. Never a file path."""
        if self.configured is not None and name in (self.configured, self.configured_name):
            return load_policy(self.configured, self.search_path)
        return load_policy(check_name(name, "name"), self.search_path)

    def load_text(self, text: str) -> LoadedPolicy:
        """A policy document sent over the API; its `include:` entries must be names, not paths."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None                 # parse_policy reports it, with the line
        if isinstance(data, dict) and isinstance(data.get("include"), list):
            for i, ref in enumerate(data["include"]):
                check_name(ref, f"include[{i}]")
        return parse_policy(text, None, self.search_path)

    # -- switching ----------------------------------------------------------------------------------

    def activate(self, loaded: LoadedPolicy, origin: str) -> ActivePolicy:
        """Make `loaded` the running policy with a fresh evaluator (blocking: the store). Call
        `_schedule()` on the loop afterwards (`switch` does both)."""
        evaluator = PolicyEvaluator(loaded, self.knob_bounds())
        with self._lock:
            version = self.store.add_policy_version(loaded.name, loaded.text)
            self.store.set_state("policy", loaded.name)
            active = ActivePolicy(loaded, evaluator, origin, version, time.time())
            previous, self.active = self.active, active
        was = f" (was {previous.name})" if previous is not None else ""
        log.info("policy %s from %s is active, mode %s, every %gs%s", active.name, active.source, active.mode,
                 active.evaluate_every, was)
        self._announce(active)
        return active

    def deactivate(self, origin: str) -> None:
        with self._lock:
            previous, self.active = self.active, None
            self.store.set_state("policy", None)
            self.store.deactivate_policies()
        if previous is not None:
            log.info("policy %s stopped (%s): the knobs stay where they are", previous.name, origin)
        self._announce(None)

    def _announce(self, active: ActivePolicy | None) -> None:
        for listener in self.listeners:
            try:
                listener(active)
            except Exception:
                log.exception("policy listener %r failed", listener)
        self.hub.publish("policy", {"ts": time.time(), **self._view(active)})

    async def switch(self, loaded: LoadedPolicy, origin: str) -> ActivePolicy:
        active = await asyncio.to_thread(self.activate, loaded, origin)
        self._schedule()
        return active

    async def switch_request(self, *, name: str | None = None,
                             yaml_text: str | None = None) -> dict[str, Any]:
        """PUT policy: load by name or from YAML (PolicyError when invalid: nothing changes), switch."""
        if name is not None:
            loaded = await asyncio.to_thread(self.load_named, name)
        else:
            loaded = await asyncio.to_thread(self.load_text, yaml_text or "")
        await self.switch(loaded, "api")
        return self.describe()

    async def reload(self, ref: str | None) -> str | None:
        """SIGHUP: re-read the configured policy `ref`. Switches when the reference or the effective
        policy changed (a policy PUT since stays otherwise); `ref` None after one stops the configured
        policy. Raises PolicyError (nothing changes). Returns what changed, or None."""
        previous, self.configured = self.configured, ref
        if ref is None:
            self.configured_text = self.configured_name = None
            if previous is not None and self.active is not None and self.active.origin != "api":
                await asyncio.to_thread(self.deactivate, "policy unset by a reload")
                self._schedule()
                return "policy unset (no policy runs)"
            return None
        try:
            loaded = await asyncio.to_thread(load_policy, ref, self.search_path)
        except PolicyError:
            self.configured = previous
            raise
        if ref == previous and loaded.text == self.configured_text:
            return None
        self.configured_text, self.configured_name = loaded.text, loaded.name
        await self.switch(loaded, "reload")
        return f"policy={loaded.name}"

    # -- views --------------------------------------------------------------------------------------

    def _view(self, active: ActivePolicy | None) -> dict[str, Any]:
        if active is None:
            return {"name": None, "source": None, "origin": None, "mode": None, "yaml": None,
                    "version_id": None}
        spec = active.loaded.policy.spec
        return {"name": active.name, "source": active.source, "origin": active.origin, "mode": active.mode,
                "yaml": active.loaded.text, "version_id": active.version_id, "since": active.since,
                "evaluate_every": spec.evaluate_every, "quality_probe_every": spec.quality_probe_every}

    def describe(self) -> dict[str, Any]:
        """GET policy: the running policy and the job's counters."""
        return {**self._view(self.active), "configured": self.configured,
                "unsupported": sorted(self.unsupported), "runs": self.runs, "missed": self.missed,
                "skipped": self.skipped, "lost": self.lost, "errors": self.errors,
                "decisions": self.decisions}

    # -- scheduling ---------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the scheduler on the running loop; the job runs while a policy is active."""
        if self.scheduler is not None:
            raise RuntimeError("policy job already started")
        self.scheduler = AsyncIOScheduler(event_loop=loop or asyncio.get_running_loop(), job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 1})
        self.scheduler.add_listener(self._on_event,
                                    EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR)
        self.scheduler.start()
        self._schedule()

    def _schedule(self) -> None:
        """(Re)schedule for the active policy's evaluate_every, or remove the job without one (loop only)."""
        if self.scheduler is None:
            return
        active, job = self.active, self.scheduler.get_job(self.JOB_ID)
        if active is None:
            if job is not None:
                job.remove()
            return
        every = active.evaluate_every
        grace = max(1, math.ceil(every))
        self._last_run = None
        if job is None:
            self.scheduler.add_job(self.run_once, "interval", seconds=every, id=self.JOB_ID,
                                   name="policy evaluation", misfire_grace_time=grace)
        else:
            job.modify(misfire_grace_time=grace)
            job.reschedule("interval", seconds=every)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop scheduling and wait (up to `timeout`) for a tick in flight, so the engine is not shut
        down under its engine.apply."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self._inflight is not None and not self._inflight.done():
            await asyncio.wait({self._inflight}, timeout=timeout)

    def _on_event(self, event) -> None:
        if event.job_id != self.JOB_ID:
            return
        if event.code == EVENT_JOB_MISSED:
            self.missed += 1
            log.warning("policy: evaluation due at %s missed", event.scheduled_run_time)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            self.skipped += 1
            log.warning("policy: evaluation skipped, the previous one is still running")
        elif event.code == EVENT_JOB_ERROR:
            log.error("policy: job failed: %r", event.exception)

    async def run_once(self) -> list[dict[str, Any]]:
        """One scheduled evaluation: the tick in a worker thread (what the scheduler runs)."""
        active = self.active
        t = time.monotonic()
        if active is not None and self._last_run is not None:
            lost = round((t - self._last_run) / active.evaluate_every) - 1
            if lost > 0:
                self.lost += lost
                log.warning("policy: %d evaluation(s) lost to a blocked event loop", lost)
        self._last_run = t
        self.runs += 1
        self._inflight = asyncio.get_running_loop().run_in_executor(None, self.tick)
        try:
            # Shielded: shutting the scheduler down must not abandon the future stop() waits for.
            return await asyncio.shield(self._inflight)
        except Exception:
            self.errors += 1
            log.exception("policy: evaluation failed")
            return []

    # -- one tick (blocking) ------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Evaluate, actuate and record once; returns the decisions as event payloads."""
        with self._lock:
            active = self.active
            if active is None or not self.engine.is_alive():
                return []
            with self.control._write_lock:
                now = time.time() if now is None else now
                pinned = set(self.store.pins(now))
                paused = bool(self.store.get_state("paused", False))
                decisions = active.evaluator.evaluate(self.window, self.engine.knobs, now, pinned=pinned,
                                                      paused=paused, unsupported=frozenset(self.unsupported))
                for d in decisions:
                    if d.outcome == "applied" and d.new is not None:
                        self._apply(d)
                    active.evaluator.record_outcome(d)
            events = [self._record(active, d) for d in decisions]
        if events:
            self.decisions += len(events)
            try:
                self.store.flush()
            except Exception as e:      # the store keeps or counts the rows; the changes stand
                log.warning("policy: could not flush %d decision(s): %s", len(events), e)
            for event in events:
                self.hub.publish("decision", event)
        return events

    def _apply(self, d: Decision) -> None:
        """Apply an "applied" decision through the engine; rewrite it from the engine's answer."""
        knob, value = d.knob, _typed(d.knob, d.new)
        try:
            outcome = self.engine.apply(**{knob: value})[knob]
        except Exception as e:          # the engine thread raised: nothing was changed
            log.exception("policy: applying %s=%r failed", knob, value)
            d.outcome, d.reason = "rejected", f"{d.reason}; applying {_fmt(value)} failed: {e}"
            return
        d.cost_s = outcome.cost_s
        if outcome.status == "applied":
            log.info("policy: %s %s -> %s (%s)", knob, _fmt(d.old), _fmt(value), d.source)
            if knob in QUALITY_KNOBS and self.quality is not None:
                self.quality.request()
            return
        if outcome.status == "rolled_back":
            d.outcome = "rolled_back"
            d.reason = (f"{d.reason}; the engine faulted applying {_fmt(value)} and rolled it back: "
                        f"{outcome.reason}")
            log.warning("policy: %s=%s rolled back by the engine: %s", knob, _fmt(value), outcome.reason)
            return
        d.outcome = "rejected"
        d.reason = f"{d.reason}; the engine rejected {_fmt(value)}: {outcome.reason}"
        if self._unsupported(knob):
            self.unsupported.add(knob)
            log.warning("policy: the engine does not support %s (%s): the policy stops moving it", knob,
                        outcome.reason)

    def _unsupported(self, knob: str) -> bool:
        """Whether the engine refuses even the value `knob` has now: then no value can be applied."""
        try:
            return self.engine.apply(**{knob: getattr(self.engine.knobs, knob)})[knob].status != "applied"
        except Exception:
            return False

    def _record(self, active: ActivePolicy, d: Decision) -> dict[str, Any]:
        return self.control._record(d.knob, _typed(d.knob, d.old), _typed(d.knob, d.new), d.outcome, d.reason,
                                    d.cost_s, dict(d.inputs), source=d.source, policy=active.name,
                                    mode=active.mode, ts=d.ts, flush=False)
