"""The control API's JSON as pydantic models: what `optd top` reads from the daemon.

Lenient on purpose: unknown fields are ignored (the API grows release by release) and the fields the
dashboard shows are optional where an older daemon may lack them. A body that does not fit raises
pydantic's ValidationError, which the client reports as a bad answer from the daemon.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

KNOB_NAMES = ("spec_length", "kv_compression", "weight_bits", "max_batch_size")
# outcomes of a decision (DESIGN.md; optd.policies.decision.Decision.outcome)
OUTCOMES = ("applied", "rejected", "rolled_back", "paused", "observe", "pinned", "held")

Number = int | float


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Pin(_Lenient):
    value: Any = None
    reason: str | None = ""
    expires_at: float | None = None
    source: str | None = None
    created_at: float | None = None


class EngineState(_Lenient):
    alive: bool = True
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None


class Status(_Lenient):
    knobs: dict[str, Number]
    pins: dict[str, Pin] = {}
    paused: bool = False
    policy: str | None = None
    mode: str | None = None
    engine: EngineState | None = None
    node: str | None = None


# The fields of a decision row (GET decisions); anything else in an event payload is an input.
_DECISION_FIELDS = {"id", "ts", "knob", "old_value", "new_value", "old", "new", "outcome", "reason", "inputs",
                    "policy", "mode", "cost_s", "source"}


class Decision(_Lenient):
    id: int | None = None
    ts: float
    knob: str
    old_value: Any = Field(default=None, validation_alias=AliasChoices("old_value", "old"))
    new_value: Any = Field(default=None, validation_alias=AliasChoices("new_value", "new"))
    outcome: str
    reason: str | None = ""
    inputs: dict[str, Any] = {}
    policy: str | None = None
    mode: str | None = None
    cost_s: float | None = None
    source: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _inputs_inline(cls, data: Any) -> Any:
        # Older daemons put an operator decision's inputs (source, action, ...) beside its fields.
        if isinstance(data, dict):
            extra = {k: v for k, v in data.items() if k not in _DECISION_FIELDS}
            inputs = data.get("inputs") or {}
            if extra or data.get("inputs") is None:
                data = {k: v for k, v in data.items() if k in _DECISION_FIELDS}
                data["inputs"] = {**extra, **inputs}
                if data.get("source") is None and isinstance(data["inputs"].get("source"), str):
                    data["source"] = data["inputs"]["source"]
        return data

    @property
    def key(self) -> tuple[float, str, str]:
        """Identity across the API and the event stream (an event carries no row id)."""
        return (round(self.ts, 6), self.knob, self.outcome)


class DecisionList(_Lenient):
    decisions: list[Decision]


_SAMPLE = TypeAdapter(dict[str, float | None])


def parse_sample(data: Any) -> dict[str, float | None]:
    """One telemetry sample: flat names to numbers (None: no data); `ts` is required."""
    sample = _SAMPLE.validate_python({k: v for k, v in dict(data).items() if not isinstance(v, str)})
    if sample.get("ts") is None:
        raise ValueError("a telemetry sample needs 'ts'")
    return sample


class KnobBounds(_Lenient):
    min: float
    max: float
    controller: str | None = None


class PolicyInfo(_Lenient):
    """GET /v1/control/policy, with what the dashboard reads from the effective YAML."""

    name: str | None = None
    source: str | None = None
    mode: str | None = None
    yaml_text: str | None = Field(default=None, validation_alias=AliasChoices("yaml", "yaml_text"))
    version_id: Any = None
    configured: str | None = None        # the policy the daemon's config names (SIGHUP goes back to it)
    unsupported: list[str] = []          # knobs this engine cannot turn: the policy leaves them alone
    bounds: dict[str, KnobBounds] = {}
    slo: dict[str, float] = {}
    guardrails: dict[str, float] = {}   # "quality_top1_min", "quality_kl_max" where the policy says so

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("yaml"), str):
            return data
        try:
            doc = yaml.safe_load(data["yaml"])
        except yaml.YAMLError:
            return data
        spec = doc.get("spec") if isinstance(doc, dict) else None
        if not isinstance(spec, dict):
            return data
        out = dict(data)
        knobs = spec.get("knobs") or {}
        out.setdefault("bounds", {k: v for k, v in knobs.items() if isinstance(v, dict) and "min" in v})
        slo = spec.get("slo") or {}
        out.setdefault("slo", {k: v for k, v in slo.items() if isinstance(v, int | float)})
        out.setdefault("guardrails", _guardrail_thresholds(spec.get("guardrails") or []))
        out.setdefault("mode", spec.get("mode"))
        return out


def _guardrail_thresholds(guardrails: list[Any]) -> dict[str, float]:
    """The quality thresholds a guardrail's `when` names in its simplest forms, e.g.
    `last(quality_top1) < 0.97` -> quality_top1_min 0.97; only to draw them beside the charts."""
    import re

    found: dict[str, float] = {}
    pattern = re.compile(r"(?:last\()?\s*(quality_top1|quality_kl)\s*\)?\s*([<>]=?)\s*([0-9.]+)")
    for g in guardrails:
        when = g.get("when", "") if isinstance(g, dict) else ""
        for metric, op, value in pattern.findall(when):
            try:
                number = float(value)
            except ValueError:
                continue
            # the guardrail fires below a floor or above a ceiling
            found[f"{metric}_{'min' if op.startswith('<') else 'max'}"] = number
    return found


class RequestError(_Lenient):
    """One request that did not end ok (GET /v1/control/requests' `recent_errors`)."""

    ts: float
    endpoint: str | None = None
    status: str                          # "error" | "rejected" | "aborted"
    error: str | None = None
    request_id: str | None = None


class RequestsInfo(_Lenient):
    """GET /v1/control/requests: the queue and the latest requests that failed, newest first."""

    running: int | None = None
    waiting: int | None = None
    recent_errors: list[RequestError] = []
    error_counts: dict[str, int] = {}


class KnobsInfo(_Lenient):
    """GET /v1/control/knobs; `ranges` per knob ({"min", "max", "integer", "supported", "reason"}) is what
    this engine accepts (optd.tui.limits reads it); absent from daemons older than it."""

    knobs: dict[str, Number] = {}
    ranges: dict[str, dict[str, Any]] = {}


class ServerInfo(_Lenient):
    """What the header shows about the daemon: from /v1/models and optd_build_info in /metrics."""

    model: str | None = None
    device: str | None = None
    version: str | None = None
