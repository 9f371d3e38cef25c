"""The condition-driven parts of a policy: guardrails (veto, rollback) and rules (`for:`, cooldown, actions).

Guardrails are evaluated first on every tick; their condition is an expression, None (no data) never
fires.
- `veto`: while the condition holds, no move that lowers quality is made: kv_compression up,
  weight_bits down. (Moves the other way raise quality and are what a policy does about a quality
  problem, so a veto never blocks them; spec_length and max_batch_size do not affect quality.)
- `rollback`: vetoes like `veto` while its condition holds, and undoes the most recent quality-lowering
  change the policy applied that is still in force (the knob still has the value the change set):
  restores the value before it and holds that knob for the guardrail's `cooldown`, during which no
  controller or rule moves it. The guardrail does not undo another change during its cooldown either
  (the quality figures it reads come from a probe that runs after the change, so until then they
  would still show the old problem). Only the policy's own applied changes are candidates (not those
  the engine rejected, see record_outcome); operators' settings are never undone.

Rules, in document order: a rule fires once its condition has held at every evaluation for `for:`
seconds (Prometheus semantics: pending from the first true evaluation, reset by a false or None one;
`for: 0` fires on the first), and not within `cooldown` seconds of its last applied action. Its action
gives each knob it names a target: `set` a value, `increase`/`decrease` by an amount in the knob's unit
or by a percentage of the current value. The target is then clamped and damped like a controller's.
"""

from dataclasses import dataclass

from optd.policies.damping import same
from optd.policies.expressions import Expression, compile_expression
from optd.policies.metrics import SampleWindow
from optd.policies.schema import Guardrail, Rule

# The sign of a move that lowers quality, per knob that can affect it.
QUALITY_KNOBS: dict[str, int] = {"kv_compression": +1, "weight_bits": -1}
INPUTS_LOOKBACK_S = 600.0


def lowers_quality(knob: str, old: float, new: float) -> bool:
    sign = QUALITY_KNOBS.get(knob)
    return sign is not None and (new - old) * sign > 0


def condition(expr: Expression, window: SampleWindow, now: float) -> bool | None:
    try:
        value = expr.evaluate(window, now)
    except ArithmeticError:   # overflow in a user's arithmetic: no verdict, like missing data
        return None
    return None if value is None else bool(value)


def inputs_of(expr: Expression, window: SampleWindow, now: float) -> dict[str, float | None]:
    """The newest value of each metric the expression reads (what the operator sees in the decision)."""
    out: dict[str, float | None] = {}
    for metric in sorted(expr.metrics):
        values = window.window(metric, INPUTS_LOOKBACK_S, now)
        out[metric] = float(values[-1]) if values else None
    return out


def expression_for(expressions: dict[str, Expression], path: str, text: str) -> Expression:
    return expressions.get(path) or compile_expression(text, path)


@dataclass(frozen=True)
class Change:
    """A change the policy applied: the candidates of a rollback."""

    ts: float
    knob: str
    old: float
    new: float
    source: str


@dataclass(frozen=True)
class Firing:
    name: str
    then: str                               # "veto" | "rollback"
    cooldown: float
    inputs: dict[str, float | None]
    text: str


class Guardrails:
    def __init__(self, guardrails: list[Guardrail], expressions: dict[str, Expression]) -> None:
        self.guardrails = list(guardrails)
        self._exprs = [expression_for(expressions, f"spec.guardrails[{i}].when", g.when)
                       for i, g in enumerate(self.guardrails)]
        self._cooldown_until: dict[str, float] = {}
        self._hold_until: dict[str, float] = {}
        self._changes: list[Change] = []

    def firing(self, window: SampleWindow, now: float) -> list[Firing]:
        """Guardrails whose condition holds now, in order; a rollback in its cooldown has then
        "veto" (it still blocks quality-lowering moves, it does not undo another change)."""
        out = []
        for g, expr in zip(self.guardrails, self._exprs, strict=True):
            if condition(expr, window, now):
                then = g.then
                if then == "rollback" and now < self._cooldown_until.get(g.name, -1.0):
                    then = "veto"
                out.append(Firing(g.name, then, g.cooldown, inputs_of(expr, window, now), g.when))
        return out

    # --- rollback bookkeeping ---

    def record_change(self, change: Change) -> None:
        if lowers_quality(change.knob, change.old, change.new):
            self._changes.append(change)

    def rollback_candidate(self, values: dict[str, float]) -> Change | None:
        """The most recent recorded quality-lowering change still in force. Changes no longer in force
        (the knob was moved since) are dropped: undoing them would set a value nobody chose last."""
        while self._changes:
            change = self._changes[-1]
            if same(values.get(change.knob), change.new):
                return change
            self._changes.pop()
        return None

    def rolled_back(self, change: Change, firing: Firing, now: float) -> None:
        """The rollback of `change` by `firing` is being applied: start the hold and the cooldown."""
        if self._changes and self._changes[-1] == change:
            self._changes.pop()
        self._hold_until[change.knob] = now + firing.cooldown
        self._cooldown_until[firing.name] = now + firing.cooldown

    def forget_change(self, change: Change) -> None:
        """A recorded change did not happen after all (the engine rejected it)."""
        if change in self._changes:
            self._changes.remove(change)

    def rollback_failed(self, change: Change, guardrail: str, retry_at: float) -> None:
        """The engine did not apply the rollback: the change is still in force; the guardrail may try
        again from `retry_at` and the knob is not held meanwhile."""
        self._changes.append(change)
        self._hold_until.pop(change.knob, None)
        self._cooldown_until[guardrail] = retry_at

    def held(self, knob: str, now: float) -> float | None:
        """Until when a rollback holds `knob`, or None."""
        until = self._hold_until.get(knob)
        return until if until is not None and now < until else None


@dataclass(frozen=True)
class RuleFiring:
    rule: Rule
    inputs: dict[str, float | None]


class RuleBook:
    def __init__(self, rules: list[Rule], expressions: dict[str, Expression]) -> None:
        self.rules = list(rules)
        self._exprs = [expression_for(expressions, f"spec.rules[{i}].when", r.when)
                       for i, r in enumerate(self.rules)]
        self._pending_since: dict[str, float] = {}
        self._cooldown_until: dict[str, float] = {}

    def knobs(self) -> set[str]:
        return {knob for r in self.rules for knob in r.then.changes}

    def evaluate(self, window: SampleWindow, now: float) -> list[RuleFiring]:
        """Advance every rule's `for:` timer and return the rules that fire now, in document order."""
        out = []
        for rule, expr in zip(self.rules, self._exprs, strict=True):
            if not condition(expr, window, now):
                self._pending_since.pop(rule.name, None)
                continue
            since = self._pending_since.setdefault(rule.name, now)
            if now - since < rule.for_ or now < self._cooldown_until.get(rule.name, -1.0):
                continue
            out.append(RuleFiring(rule, inputs_of(expr, window, now)))
        return out

    def acted(self, rule: Rule, now: float) -> None:
        """The rule's action is being applied: start its cooldown."""
        if rule.cooldown > 0:
            self._cooldown_until[rule.name] = now + rule.cooldown


def action_target(rule: Rule, knob: str, current: float) -> float:
    """Where the rule's action puts `knob`, before clamping and damping."""
    op, amount = rule.then.op, rule.then.changes[knob]
    if op == "set":
        return float(amount)
    delta = abs(current) * float(amount[:-1]) / 100 if isinstance(amount, str) else float(amount)
    return current + delta if op == "increase" else current - delta


def describe_action(rule: Rule, knob: str) -> str:
    op, amount = rule.then.op, rule.then.changes[knob]
    return f"{op} {knob} {'to' if op == 'set' else 'by'} {amount}"
