"""The policy document (apiVersion optd/v1, kind Policy) as frozen pydantic models.

Unknown keys are rejected everywhere; durations ("800ms", "30s", bare seconds) become float seconds;
every `when` is compiled by optd.policies.expressions, so a model that exists holds only expressions
over known names. Checks that depend on a knob (its natural range, which controllers fit it) raise
PydanticCustomError("policy", ...) with a `subpath` in its context: the loader appends it to the
error's location so the message points at e.g. spec.knobs.weight_bits.min rather than spec.knobs.
"""

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from optd.policies.durations import parse_duration
from optd.policies.errors import PolicyError
from optd.policies.expressions import compile_expression
from optd.policies.metrics import KNOB_NAMES

KnobName = Literal[KNOB_NAMES]  # type: ignore[valid-type]
Controller = Literal["goodput", "aimd", "rules", "builtin", "none"]


@dataclass(frozen=True)
class KnobLimits:
    """A knob's natural range: what any policy may ask of it, whatever the engine supports."""

    lo: float
    hi: float
    integer: bool
    values: tuple[float, ...] | None      # the only values allowed, where the knob is discrete
    controllers: tuple[str, ...]         # controllers that fit this knob


KNOB_LIMITS: dict[str, KnobLimits] = {
    "spec_length": KnobLimits(0, 32, True, None, ("goodput", "rules", "none")),
    "kv_compression": KnobLimits(0.0, 0.95, False, None, ("builtin", "rules", "none")),
    "weight_bits": KnobLimits(4, 16, True, (4, 8, 16), ("builtin", "rules", "none")),
    "max_batch_size": KnobLimits(1, math.inf, True, None, ("aimd", "rules", "none")),
}
assert set(KNOB_LIMITS) == set(KNOB_NAMES), "every knob needs its limits here"


def knob_value_problem(knob: str, value: float) -> str | None:
    """Why `value` is outside `knob`'s natural range, or None."""
    lim = KNOB_LIMITS[knob]
    if lim.values is not None and value not in lim.values:
        return f"{knob} must be one of {', '.join(str(v) for v in lim.values)}, got {_num(value)}"
    if lim.integer and value != int(value):
        return f"{knob} must be a whole number, got {_num(value)}"
    if not lim.lo <= value <= lim.hi:
        hi = "" if math.isinf(lim.hi) else f"..{_num(lim.hi)}"
        return f"{knob} must be in {_num(lim.lo)}{hi}, got {_num(value)}" if hi else \
            f"{knob} must be >= {_num(lim.lo)}, got {_num(value)}"
    return None


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _number(value: Any) -> Any:
    # Reject YAML booleans (yes/no/true) where a number is meant, and non-finite numbers.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _duration(value: Any) -> float:
    return parse_duration(value)


def _condition(text: str) -> str:
    try:
        expr = compile_expression(text)
    except PolicyError as e:
        raise ValueError(e.message) from None
    if not expr.is_condition:
        raise ValueError(f"{text!r} is a number, not a condition: compare it (e.g. '... > 0.9')")
    return text


Number = Annotated[float, BeforeValidator(_number)]
Duration = Annotated[float, BeforeValidator(_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
Condition = Annotated[str, AfterValidator(_condition)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Slo(_Model):
    """Latency objectives in seconds; None leaves that one unchecked."""

    ttft_p95: PositiveDuration | None = None
    itl_p95: PositiveDuration | None = None
    e2e_p95: PositiveDuration | None = None


class Guardrail(_Model):
    name: Name
    when: Condition
    then: Literal["rollback", "veto"]
    cooldown: Duration = 300.0


class KnobPolicy(_Model):
    """Bounds and controller of one knob; which values fit depends on the knob (checked in PolicySpec)."""

    min: Number
    max: Number
    controller: Controller
    tolerance: Annotated[Number, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _ordered(self) -> "KnobPolicy":
        if self.min > self.max:
            raise PydanticCustomError("policy", "{message}", {
                "message": f"min ({_num(self.min)}) is above max ({_num(self.max)})", "subpath": ("min",)})
        return self


class Direction(_Model):
    stabilization_window: Duration = 0.0
    max_step: Annotated[Number, Field(gt=0)] | None = None


def _direction_default(window: float):
    # A direction written without stabilization_window keeps the default window of that direction,
    # not Direction's 0: `up: {max_step: 2}` must not silently turn up-damping off.
    def fill(value: Any) -> Any:
        if isinstance(value, dict) and "stabilization_window" not in value:
            return {"stabilization_window": window, **value}
        return value
    return BeforeValidator(fill)


class Behavior(_Model):
    """HPA-style damping per direction: stabilization window and largest step per decision."""

    up: Annotated[Direction, _direction_default(30.0)] = Direction(stabilization_window=30.0)
    down: Annotated[Direction, _direction_default(120.0)] = Direction(stabilization_window=120.0)


def _amount(value: Any) -> Any:
    # A number, or a percentage string like "25%" (normalized to "<number>%").
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a percentage like '25%', got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*", value)
        if match:
            return f"{_num(float(match.group(1)))}%"
    raise ValueError(f"expected a number or a percentage like '25%', got {value!r}")


Amount = Annotated[float | str, BeforeValidator(_amount)]


def _percent(value: float | str) -> float | None:
    return float(value[:-1]) if isinstance(value, str) else None


class Action(_Model):
    """Exactly one of set / increase / decrease, each mapping knob names to a value or an amount.

    An amount is a number in the knob's unit or a percentage of the knob's current value ("25%",
    increase/decrease only). The evaluator clamps results to the knob's bounds and damps them.
    """

    set: dict[KnobName, Amount] | None = None
    increase: dict[KnobName, Amount] | None = None
    decrease: dict[KnobName, Amount] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Action":
        given = [op for op in ("set", "increase", "decrease") if getattr(self, op) is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(f"an action needs exactly one of set, increase, decrease (got {what})")
        op = given[0]
        changes: dict[str, float | str] = getattr(self, op)
        if not changes:
            raise PydanticCustomError("policy", "{message}", {
                "message": f"{op} names no knob", "subpath": (op,)})
        for knob, amount in changes.items():
            pct = _percent(amount)
            if op == "set":
                problem = "set takes a value, not a percentage" if pct is not None else \
                    knob_value_problem(knob, float(amount))
            elif pct is not None:
                problem = "a percentage must be above 0%" if pct <= 0 else \
                    "decrease by more than 100% is not possible" if op == "decrease" and pct > 100 else None
            else:
                problem = f"{op} needs an amount above 0, got {_num(float(amount))}" if amount <= 0 else None
            if problem:
                raise PydanticCustomError("policy", "{message}", {"message": problem, "subpath": (op, knob)})
        return self

    @property
    def op(self) -> Literal["set", "increase", "decrease"]:
        return "set" if self.set is not None else "increase" if self.increase is not None else "decrease"

    @property
    def changes(self) -> dict[str, float | str]:
        """The knob -> value/amount mapping of whichever operation this is."""
        return dict(getattr(self, self.op))


class Rule(_Model):
    name: Name
    when: Condition
    for_: Duration = Field(0.0, alias="for")
    then: Action
    cooldown: Duration = 0.0


class PolicySpec(_Model):
    mode: Literal["enforce", "observe"] = "enforce"
    evaluate_every: PositiveDuration = 5.0
    slo: Slo = Slo()
    guardrails: list[Guardrail] = []
    knobs: dict[KnobName, KnobPolicy] = {}
    behavior: Behavior = Behavior()
    rules: list[Rule] = []
    quality_probe_every: PositiveDuration = 300.0

    @field_validator("knobs")
    @classmethod
    def _knobs_fit(cls, knobs: dict[str, KnobPolicy]) -> dict[str, KnobPolicy]:
        for name, kp in knobs.items():
            lim = KNOB_LIMITS[name]
            if kp.controller not in lim.controllers:
                raise PydanticCustomError("policy", "{message}", {
                    "message": f"controller {kp.controller!r} does not fit {name} "
                               f"(use one of: {', '.join(lim.controllers)})",
                    "subpath": (name, "controller")})
            for end in ("min", "max"):
                problem = knob_value_problem(name, getattr(kp, end))
                if problem:
                    raise PydanticCustomError("policy", "{message}", {
                        "message": problem, "subpath": (name, end)})
        return knobs

    @model_validator(mode="after")
    def _consistent(self) -> "PolicySpec":
        for field in ("guardrails", "rules"):
            seen: set[str] = set()
            for i, item in enumerate(getattr(self, field)):
                if item.name in seen:
                    raise PydanticCustomError("policy", "{message}", {
                        "message": f"duplicate name {item.name!r}", "subpath": (field, i, "name")})
                seen.add(item.name)
        for i, rule in enumerate(self.rules):
            for knob in rule.then.changes:
                kp = self.knobs.get(knob)
                if kp is not None and kp.controller == "none":
                    raise PydanticCustomError("policy", "{message}", {
                        "message": f"{knob} has controller 'none' (the policy never moves it), "
                                   "so no rule may change it",
                        "subpath": ("rules", i, "then", rule.then.op, knob)})
        return self


class Metadata(_Model):
    name: Name
    description: str = ""


class Policy(_Model):
    apiVersion: Literal["optd/v1"]
    kind: Literal["Policy"]
    metadata: Metadata
    include: list[str] = []
    spec: PolicySpec
