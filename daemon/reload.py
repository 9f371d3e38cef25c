"""SIGHUP: re-read the configuration and apply what can change while the daemon serves.

The reload follows systemd's protocol (sd_notify(3)): RELOADING=1 with MONOTONIC_USEC first, READY=1
when done whatever the outcome, and a STATUS= line saying what happened. The configuration is loaded
exactly as at start (the same file, the OPTD_* environment, the same command-line flags on top), and
compared with the one in force.

What applies at once:
- `knobs.*`: the new value becomes the knob's configured value (what an unpin or an expired pin goes
  back to). An unpinned knob is set on the engine now, recorded as a decision with source "config";
  a pinned one keeps its pin. A knob the file no longer sets stays where it is.
- `server.max_waiting`: the admission bound, from the next request on.
- `server.drain_timeout_s`: used by the next SIGTERM.
- `store.raw_retention_s`: the daemon's periodic prune reads it from the configuration in force.
- `policy`: re-read on every reload, even when the reference is the same (its file may have changed);
  the policy switches when the reference or the effective policy changed (optd.daemon.policy_job's
  `reload`: a policy switched through the API since stays otherwise), and stops when `policy:` was
  removed. An invalid policy changes nothing: the running policy stays, and STATUS= says so.

Everything else (engine.*, server.host/port/control_token, store.url/flush_interval_s, telemetry.*,
slo.*, mqtt.*) needs a restart: the reload names those fields in STATUS= and the log, and the
daemon keeps running with, and later reloads compare against, the values it started with. A configuration
that fails to load or validate changes nothing; its error (file:line: field: problem) is logged and
shown in STATUS=.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import BaseModel

from optd.daemon.config import ConfigError, DaemonConfig
from optd.daemon.control_api import ControlRoutes
from optd.daemon.openai_api import OpenAIRoutes
from optd.daemon.sdnotify import READY, Notifier, reloading, status
from optd.policies.errors import PolicyError

if TYPE_CHECKING:
    from optd.daemon.policy_job import PolicyJob

log = logging.getLogger(__name__)

# Fields a reload applies (or that need nothing applied); knobs.* are handled one by one.
RUNTIME_FIELDS = frozenset({"server.max_waiting", "server.drain_timeout_s", "store.raw_retention_s"})
# STATUS= is shown whole by `systemctl status`; a long list of errors is cut, the log has all of it.
MAX_STATUS_CHARS = 400


@dataclass
class ReloadReport:
    applied: list[str] = field(default_factory=list)    # "server.max_waiting=8", ...
    restart: list[str] = field(default_factory=list)    # fields whose new value needs a restart
    failed: list[str] = field(default_factory=list)     # "knobs.x: why", for values the engine refused
    error: str | None = None                            # the whole file was refused

    def summary(self) -> str:
        if self.error is not None:
            return f"reload failed, running configuration kept: {self.error}"
        parts = [f"applied {', '.join(self.applied)}" if self.applied else "nothing to apply"]
        if self.failed:
            parts.append(f"refused {'; '.join(self.failed)}")
        if self.restart:
            parts.append(f"needs a restart: {', '.join(self.restart)}")
        return "reloaded: " + "; ".join(parts)


def changed_fields(old: DaemonConfig, new: DaemonConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted field path -> (old, new) for every leaf that differs (SecretStr compares by value)."""
    out: dict[str, tuple[Any, Any]] = {}
    for section in type(old).model_fields:
        a, b = getattr(old, section), getattr(new, section)
        if isinstance(a, BaseModel) and isinstance(b, BaseModel):
            for name in type(a).model_fields:
                if getattr(a, name) != getattr(b, name):
                    out[f"{section}.{name}"] = (getattr(a, name), getattr(b, name))
        elif a != b:
            out[section] = (a, b)
    return out


class Reloader:
    """Owns the configuration in force; `request()` is the SIGHUP handler."""

    def __init__(self, load: Callable[[], DaemonConfig], running: DaemonConfig, notifier: Notifier,
                 control: ControlRoutes, openai: OpenAIRoutes, server: uvicorn.Server, *,
                 policy: PolicyJob | None = None) -> None:
        self.load, self.running, self.notifier = load, running, notifier
        self.control, self.openai, self.server = control, openai, server
        self.policy = policy
        self._task: asyncio.Task | None = None
        self._again = False

    def request(self) -> None:
        """Start a reload on the running loop; a SIGHUP during one queues a single further reload
        (the file may have changed again after this one read it)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> ReloadReport:
        self.notifier.notify(reloading(), status("reloading the configuration"))
        try:
            report = await self._reload()
        except Exception as e:   # a bug here must not leave systemd waiting for READY=1
            log.exception("configuration reload failed")
            report = ReloadReport(error=f"internal error: {e}")
        text = report.summary()
        level = (logging.ERROR if report.error or report.failed else
                 logging.WARNING if report.restart else logging.INFO)
        log.log(level, "%s", text)
        if len(text) > MAX_STATUS_CHARS:
            text = text[:MAX_STATUS_CHARS - 20] + " ... (see the log)"
        self.notifier.notify(READY, status(text))
        return report

    async def _reload(self) -> ReloadReport:
        try:
            new = await asyncio.to_thread(self.load)
        except (ConfigError, ValueError) as e:   # one line per problem; STATUS= is one line
            return ReloadReport(error="; ".join(str(e).splitlines()))
        report = ReloadReport()
        changes = changed_fields(self.running, new)
        knobs = {path.removeprefix("knobs."): new_value for path, (_, new_value) in changes.items()
                 if path.startswith("knobs.")}
        keep_knobs = await asyncio.to_thread(self._apply_knobs, knobs, report) if knobs else {}
        policy_ok = await self._reload_policy(new.policy, report) if self.policy is not None else False
        sections: dict[str, dict[str, Any]] = {}
        for path, (_, value) in changes.items():
            if path.startswith("knobs.") or (path == "policy" and self.policy is not None):
                continue
            if path not in RUNTIME_FIELDS:
                report.restart.append(path)
                continue
            self._apply(path, value)
            section, _, name = path.partition(".")
            sections.setdefault(section, {})[name] = value
            report.applied.append(f"{path}={value}")
        applied_knobs = {k: v for k, v in knobs.items() if k not in keep_knobs}
        if applied_knobs:
            sections["knobs"] = applied_knobs
        # model_copy skips validation: the result mixes new runtime values with the old restart-only
        # ones, which is exactly what is in force.
        self.running = self.running.model_copy(update={
            s: getattr(self.running, s).model_copy(update=fields) for s, fields in sections.items()})
        if policy_ok:
            self.running = self.running.model_copy(update={"policy": new.policy})
        return report

    async def _reload_policy(self, ref: str | None, report: ReloadReport) -> bool:
        """Re-read the configured policy; False when it is invalid (the running one stays)."""
        assert self.policy is not None
        try:
            changed = await self.policy.reload(ref)
        except PolicyError as e:
            running = self.policy.active.name if self.policy.active is not None else "none"
            report.failed.append(f"policy {ref}: {'; '.join(str(e).splitlines())} (running policy {running} "
                                 "kept)")
            return False
        if changed is not None:
            report.applied.append(changed)
        return True

    def _apply(self, path: str, value: Any) -> None:
        if path == "server.max_waiting":
            self.openai.max_waiting = value
        elif path == "server.drain_timeout_s":
            # What uvicorn reads when it shuts down (whole seconds, as at start).
            self.server.config.timeout_graceful_shutdown = int(value)

    def _apply_knobs(self, knobs: dict[str, Any], report: ReloadReport) -> dict[str, Any]:
        """Apply changed knob values (blocking: call from a worker thread). Returns the knobs the
        engine refused, which keep their old configured value."""
        control, engine = self.control, self.control.engine
        refused: dict[str, Any] = {}
        # The control API's lock: a pin or unpin arriving meanwhile must not interleave with this.
        with control._write_lock:
            pins = control.store.pins()
            for name, value in knobs.items():
                current = getattr(engine.knobs, name)
                if value is None:
                    control.config_knobs.pop(name, None)
                    report.applied.append(f"knobs.{name} unset (stays at {current})")
                    continue
                if name in pins:
                    control.config_knobs[name] = control.baseline[name] = value
                    report.applied.append(f"knobs.{name}={value} (pinned at {pins[name]['value']}: "
                                          "takes effect when the pin goes)")
                    continue
                outcome = engine.apply(**{name: value})[name]
                if outcome.status != "applied":
                    refused[name] = value
                    report.failed.append(f"knobs.{name}={value}: {outcome.reason}")
                    continue
                control.config_knobs[name] = control.baseline[name] = outcome.value
                report.applied.append(f"knobs.{name}={outcome.value}")
                event = control._record(name, current, outcome.value, "applied", "configuration reloaded",
                                        outcome.cost_s, {"source": "config", "action": "reload"})
                control.hub.publish("override", event)
        return refused
