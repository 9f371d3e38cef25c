"""PolicyEvaluator: one tick of a policy over a window of samples -> the Decisions it makes.

Pure and deterministic: no clock, no engine, no I/O. The caller (the daemon's policy job, or a replay)
passes the window, the knob values in force, the time and the overrides; it applies the `new` of every
decision whose outcome is "applied", rewrites the outcome to "rejected"/"rolled_back" when the engine
refuses or faults, and hands each decision back through `record_outcome`. All state (stabilization
windows, `for:` timers, cooldowns, rollback candidates) lives in the evaluator, so replaying the same
samples through a fresh evaluator gives the same decisions.

One tick, one decision per knob at most, by precedence guardrail > rule > controller:
1. Knobs the engine refused as unsupported (`unsupported`) are reported once (outcome "rejected", new
   None) and skipped from then on.
2. Guardrails: a firing `rollback` undoes the most recent quality-lowering change still in force (that
   knob is then done for this tick and held for the guardrail's cooldown); every firing guardrail
   (veto, or rollback) blocks every quality-lowering move of this tick. A guardrail that fires with
   nothing to undo or veto records nothing. Guardrails come first because they protect what the rest
   optimizes.
3. Rules: for each knob, the first firing rule (document order) that names it sets its target; rules
   come before the controller because an operator wrote them for this situation.
4. Otherwise the knob's controller (goodput, aimd, builtin) recommends; `rules` and `none` have none.
The target is then damped (optd.policies.damping); if the knob would move, the outcome is:
"pinned" when an operator pinned the knob (it is never moved), else "paused" when actuation is
paused, else "observe" in `mode: observe`, else "applied".

What is recorded, so the log stays readable: a decision only when the knob would move, when a veto
blocks a move, or when a firing rule is held by damping ("held", new = the value it wanted). A
decision that would only repeat the last one recorded for the same knob (same outcome, old, new and
source; for "held": same source and direction) is not emitted again for `repeat_after` seconds (then
once more, as a reminder that the knob is still pinned, paused, vetoed...); applied decisions are
never suppressed. A knob whose change the engine rejected is not asked for that same
value again for `retry_after` seconds. A pinned knob is recorded only when the policy would have
moved it.
"""

import math
from collections.abc import Collection
from dataclasses import dataclass

from optd.engine.knobs import Knobs
from optd.policies.controllers import (
    Controller,
    ControllerInput,
    Recommendation,
    controller_for,
    fmt,
)
from optd.policies.damping import NATURAL_BOUNDS, Damper, same
from optd.policies.decision import Decision, Outcome
from optd.policies.guardrails import (
    Change,
    Firing,
    Guardrails,
    RuleBook,
    RuleFiring,
    action_target,
    describe_action,
    lowers_quality,
)
from optd.policies.loader import LoadedPolicy
from optd.policies.metrics import KNOB_NAMES, SampleWindow

KnobBounds = dict[str, tuple[float | None, float | None]]


@dataclass(frozen=True)
class _Rollback:
    change: Change
    guardrail: str


class PolicyEvaluator:
    """`knob_bounds`: the engine's envelope per knob, {name: (lo, hi)} (None for an open end), e.g.
    {"max_batch_size": (1, max_num_seqs), "spec_length": (0, max_spec_length)}; targets are clamped
    to the intersection of it, the policy's min/max and the knob's natural range. Where the policy's
    range lies outside the engine's, the engine's wins."""

    def __init__(self, loaded: LoadedPolicy, knob_bounds: KnobBounds | None = None, *,
                 retry_after: float = 60.0, repeat_after: float = 600.0) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.spec = loaded.policy.spec
        self.knob_bounds: KnobBounds = dict(knob_bounds or {})
        self.retry_after, self.repeat_after = retry_after, repeat_after
        self.damper = Damper(self.spec.behavior)
        self.guardrails = Guardrails(self.spec.guardrails, loaded.expressions)
        self.rules = RuleBook(self.spec.rules, loaded.expressions)
        self.controllers: dict[str, Controller] = {}
        for knob, kp in self.spec.knobs.items():
            ctl = controller_for(knob, kp.controller)
            if ctl is not None:
                self.controllers[knob] = ctl
        # Knobs this policy may move, in the canonical order (deterministic decision order).
        movable = set(self.controllers) | self.rules.knobs() | {
            k for k, kp in self.spec.knobs.items() if kp.controller == "rules"}
        self.knobs = [k for k in KNOB_NAMES if k in movable]
        self._seen: dict[str, tuple[float, float]] = {}        # knob -> (value, in force since)
        self._applied: dict[str, tuple[float, float]] = {}     # knob -> (ts, new) of our last applied change
        self._last: dict[str, tuple[tuple, float]] = {}        # knob -> (key, ts) of the last non-applied one
        self._rejected: dict[str, tuple[float, float]] = {}    # knob -> (value, retry no sooner than)
        self._reported: set[str] = set()
        self._pending: dict[tuple[float, str], _Rollback] = {}

    # --- public -----------------------------------------------------------------------------------------

    def bounds(self, knob: str) -> tuple[float, float]:
        lo, hi = NATURAL_BOUNDS[knob]
        kp = self.spec.knobs.get(knob)
        if kp is not None:
            lo, hi = max(lo, kp.min), min(hi, kp.max)
        elo, ehi = self.knob_bounds.get(knob, (None, None))
        elo = -math.inf if elo is None else float(elo)
        ehi = math.inf if ehi is None else float(ehi)
        # Each end clamped into the engine's range: the intersection where they overlap, else the
        # engine's value nearest to the policy's range.
        return min(max(lo, elo), ehi), min(max(hi, elo), ehi)

    def evaluate(self, window: SampleWindow, knobs: Knobs, now: float, pinned: Collection[str] = (),
                 paused: bool = False, unsupported: Collection[str] = frozenset()) -> list[Decision]:
        values = {n: float(getattr(knobs, n)) for n in KNOB_NAMES}
        self._track(values, now)
        out: list[Decision] = []

        for knob in self.knobs:
            if knob in unsupported and knob not in self._reported:
                self._reported.add(knob)
                out.append(Decision(
                    ts=now, knob=knob, old=values[knob], new=None, source=f"policy:{self.name}",
                    reason=f"the engine does not support {knob}: the policy will not move it",
                    outcome="rejected"))

        firings = self.guardrails.firing(window, now)
        vetoes = firings   # every firing guardrail blocks quality-lowering moves
        done: set[str] = set()
        for f in firings:
            if f.then == "rollback":
                knob = self._rollback(f, values, now, pinned, paused, unsupported, out)
                if knob is not None:
                    done.add(knob)

        rule_firings = self.rules.evaluate(window, now)
        for knob in self.knobs:
            if knob in done or knob in unsupported:
                continue
            if self.guardrails.held(knob, now) is not None:
                continue
            self._knob(knob, window, knobs, values, now, pinned, paused, vetoes, rule_firings, out)
        return out

    def record_outcome(self, decision: Decision) -> None:
        """What became of an emitted decision (call it for every decision; only applied decisions that
        the engine rejected or rolled back change anything: evaluate() assumed they would be applied)."""
        rollback = self._pending.pop((decision.ts, decision.knob), None)
        if decision.outcome not in ("rejected", "rolled_back") or decision.new is None:
            return
        self._rejected[decision.knob] = (decision.new, decision.ts + self.retry_after)
        if self._applied.get(decision.knob) == (decision.ts, decision.new):
            del self._applied[decision.knob]
        if rollback is not None:
            self.guardrails.rollback_failed(rollback.change, rollback.guardrail,
                                            retry_at=decision.ts + self.retry_after)
        elif decision.old is not None:
            # The change did not happen: it is no rollback candidate (the in-force check would also
            # drop it, but not if the knob later reaches that value by another way).
            self.guardrails.forget_change(Change(decision.ts, decision.knob, decision.old, decision.new,
                                                 decision.source))

    # --- one knob ---------------------------------------------------------------------------------------

    def _knob(self, knob: str, window: SampleWindow, knobs: Knobs, values: dict[str, float], now: float,
              pinned: Collection[str], paused: bool, vetoes: list[Firing], rule_firings: list[RuleFiring],
              out: list[Decision]) -> None:
        current = values[knob]
        lo, hi = self.bounds(knob)
        kp = self.spec.knobs.get(knob)
        firing = next((f for f in rule_firings if knob in f.rule.then.changes), None)
        if firing is not None:
            rule = firing.rule
            held_for = f" for {fmt(rule.for_)}s" if rule.for_ else ""
            rec = Recommendation(
                action_target(rule, knob, current),
                f"rule {rule.name}: `{rule.when}` held{held_for}: {describe_action(rule, knob)}",
                firing.inputs)
            source = f"policy:{self.name}/{rule.name}"
        else:
            controller = self.controllers.get(knob)
            if controller is None:
                return
            up = self.spec.behavior.up.max_step
            # The controller searches the effective range (policy within the engine's envelope).
            bounds = kp.model_copy(update={"min": lo, "max": hi})
            rec = controller.recommend(ControllerInput(
                window=window, now=now, current=current, bounds=bounds, slo=self.spec.slo,
                since=self._seen[knob][1], knobs=knobs, step_up=up))
            source = f"policy:{self.name}/{controller.name}"
        if rec.value is None:
            return
        damped = self.damper.damp(knob, now, current, rec.value, lo=lo, hi=hi,
                                  tolerance=kp.tolerance if kp is not None else 0.0, urgent=rec.urgent)
        target = damped.value
        direction = "up" if damped.desired > current else "down"
        if not same(target, current):
            veto = next((v for v in vetoes if lowers_quality(knob, current, target)), None)
            if veto is not None:
                self._emit(out, Decision(
                    ts=now, knob=knob, old=current, new=target, source=f"guardrail:{veto.name}",
                    inputs={**rec.inputs, **veto.inputs}, outcome="held",
                    reason=f"vetoed by guardrail {veto.name} (`{veto.text}` holds): {source} wanted "
                           f"{fmt(current)} -> {fmt(target)}: {rec.reason}"),
                    key=("held", f"veto:{veto.name}", direction))
                return
            retry = self._rejected.get(knob)
            if retry is not None and same(retry[0], target) and now < retry[1]:
                return
            reason = rec.reason + (f"; limited by {damped.limited_by}" if damped.limited_by else "")
            outcome = self._outcome(knob, pinned, paused)
            emitted = self._emit(out, Decision(ts=now, knob=knob, old=current, new=target, source=source,
                                               inputs=rec.inputs, reason=reason, outcome=outcome))
            if emitted and outcome == "applied":
                self._applied_change(knob, current, target, source, now)
                if firing is not None:
                    self.rules.acted(firing.rule, now)
        elif firing is not None and damped.held_by is not None:
            self._emit(out, Decision(ts=now, knob=knob, old=current, new=damped.desired, source=source,
                                     inputs=rec.inputs, outcome="held",
                                     reason=f"{rec.reason}; held by {damped.held_by}"),
                       key=("held", source, direction))

    def _rollback(self, f: Firing, values: dict[str, float], now: float, pinned: Collection[str],
                  paused: bool, unsupported: Collection[str], out: list[Decision]) -> str | None:
        change = self.guardrails.rollback_candidate(values)
        if change is None or change.knob in unsupported:
            return None
        knob = change.knob
        outcome = self._outcome(knob, pinned, paused)
        decision = Decision(
            ts=now, knob=knob, old=values[knob], new=change.old, source=f"guardrail:{f.name}",
            inputs=f.inputs, outcome=outcome,
            reason=f"guardrail {f.name}: `{f.text}` holds: undo {knob} {fmt(change.old)} -> "
                   f"{fmt(change.new)} ({change.source}) and hold {knob} for {fmt(f.cooldown)}s")
        if self._emit(out, decision) and outcome == "applied":
            self.guardrails.rolled_back(change, f, now)
            self.damper.forget(knob)
            self._applied[knob] = (now, change.old)
            self._pending[(now, knob)] = _Rollback(change, f.name)
        return knob

    # --- helpers ----------------------------------------------------------------------------------------

    def _outcome(self, knob: str, pinned: Collection[str], paused: bool) -> Outcome:
        if knob in pinned:
            return "pinned"
        if paused:
            return "paused"
        return "observe" if self.spec.mode == "observe" else "applied"

    def _emit(self, out: list[Decision], d: Decision, key: tuple | None = None) -> bool:
        if d.outcome == "applied":
            self._last.pop(d.knob, None)
            out.append(d)
            return True
        key = key or (d.outcome, d.old, d.new, d.source)
        last = self._last.get(d.knob)
        if last is not None and last[0] == key and d.ts - last[1] < self.repeat_after:
            return False
        self._last[d.knob] = (key, d.ts)
        out.append(d)
        return True

    def _applied_change(self, knob: str, old: float, new: float, source: str, now: float) -> None:
        self._applied[knob] = (now, new)
        self.guardrails.record_change(Change(now, knob, old, new, source))

    def _track(self, values: dict[str, float], now: float) -> None:
        """Since when each knob's value has been in force: from our own applied change when it is the
        one now in force, else from the first tick that saw the value (unknown before the first tick:
        assumed long in force)."""
        for knob, value in values.items():
            seen = self._seen.get(knob)
            if seen is None:
                self._seen[knob] = (value, -math.inf)
            elif not same(seen[0], value):
                applied = self._applied.get(knob)
                since = applied[0] if applied is not None and same(applied[1], value) else now
                self._seen[knob] = (value, since)
