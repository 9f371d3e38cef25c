"""The schema: DESIGN.md's example is valid, durations and defaults, and per-knob checks."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from optd.daemon.telemetry import SAMPLE_FIELDS
from optd.policies.durations import parse_duration
from optd.policies.errors import PolicyError
from optd.policies.loader import parse_policy
from optd.policies.metrics import METRIC_NAMES
from optd.policies.schema import Action, Behavior, KnobPolicy, Policy, PolicySpec

DESIGN = Path(__file__).resolve().parents[3] / "shared" / "DESIGN.md"
BALANCED = Path(__file__).resolve().parents[2] / "policies" / "presets" / "balanced.yaml"


def design_example() -> str:
    """The policy in DESIGN.md's "Telemetry sample and policy format" section, as written there."""
    text = DESIGN.read_text()
    section = text[text.index("## Telemetry sample and policy format"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_sample_fields_are_the_metric_names():
    assert tuple(SAMPLE_FIELDS) == ("ts", *METRIC_NAMES)


def test_design_example_is_valid_with_durations_in_seconds():
    """The balanced preset is DESIGN.md's example, verbatim (checked below where DESIGN.md is at hand)."""
    loaded = parse_policy(BALANCED.read_text(), str(BALANCED))
    spec = loaded.policy.spec
    assert loaded.name == "balanced" and spec.mode == "enforce"
    assert spec.evaluate_every == 5.0
    assert (spec.slo.ttft_p95, spec.slo.itl_p95, spec.slo.e2e_p95) == (0.8, 0.06, None)
    assert spec.guardrails[0].then == "rollback" and spec.guardrails[0].cooldown == 300.0
    assert spec.knobs["spec_length"].controller == "goodput" and spec.knobs["max_batch_size"].max == 128
    assert (spec.behavior.up.stabilization_window, spec.behavior.up.max_step) == (30.0, 2)
    assert (spec.behavior.down.stabilization_window, spec.behavior.down.max_step) == (120.0, 1)
    rule = spec.rules[0]
    assert (rule.for_, rule.cooldown) == (15.0, 60.0)
    assert rule.then.op == "increase" and rule.then.changes == {"kv_compression": 0.25}
    assert set(loaded.expressions) == {"spec.guardrails[0].when", "spec.rules[0].when"}


@pytest.mark.skipif(not DESIGN.is_file(), reason="the design contract lives beside the repository, "
                    "not in it; this checkout has no ../shared/DESIGN.md")
def test_the_balanced_preset_is_the_design_example():
    assert yaml.safe_load(BALANCED.read_text()) == yaml.safe_load(design_example())


def test_defaults_and_frozen_models():
    spec = PolicySpec()
    assert spec.mode == "enforce" and spec.evaluate_every == 5 and spec.quality_probe_every == 300
    assert spec.slo.ttft_p95 is None and spec.knobs == {} and spec.rules == [] and spec.guardrails == []
    assert (spec.behavior.up.stabilization_window, spec.behavior.up.max_step) == (30.0, None)
    assert (spec.behavior.down.stabilization_window, spec.behavior.down.max_step) == (120.0, None)
    with pytest.raises(ValidationError):
        spec.mode = "observe"  # type: ignore[misc]


def test_a_direction_keeps_its_own_default_window():
    behavior = Behavior.model_validate({"up": {"max_step": 2}, "down": {"max_step": 1}})
    assert behavior.up.stabilization_window == 30.0 and behavior.down.stabilization_window == 120.0
    assert Behavior.model_validate({"up": {"stabilization_window": "0s"}}).up.stabilization_window == 0


@pytest.mark.parametrize(("value", "seconds"), [
    ("800ms", 0.8), ("30s", 30), ("5m", 300), ("1h", 3600), ("1.5s", 1.5), (".5s", 0.5), (5, 5), ("2", 2),
])
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["-1s", "1e3", "inf", "5 sec", "5d", "", True, None, -2, [], "nan"])
def test_bad_durations_name_the_value(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        parse_duration(value)


@pytest.mark.parametrize(("knob", "body", "fragment"), [
    ("spec_length", {"min": 0, "max": 33, "controller": "goodput"}, "spec_length must be in 0..32, got 33"),
    ("spec_length", {"min": 0.5, "max": 4, "controller": "rules"}, "must be a whole number"),
    ("spec_length", {"min": 0, "max": 4, "controller": "aimd"}, "controller 'aimd' does not fit spec_length"),
    ("kv_compression", {"min": 0, "max": 0.96, "controller": "builtin"}, "kv_compression must be in 0..0.95"),
    ("kv_compression", {"min": 0, "max": 0.5, "controller": "goodput"}, "does not fit kv_compression"),
    ("weight_bits", {"min": 6, "max": 16, "controller": "rules"}, "weight_bits must be one of 4, 8, 16"),
    ("weight_bits", {"min": 8, "max": 16, "controller": "aimd"}, "does not fit weight_bits"),
    ("max_batch_size", {"min": 0, "max": 8, "controller": "aimd"}, "max_batch_size must be >= 1"),
    ("max_batch_size", {"min": 1, "max": 8, "controller": "builtin"}, "does not fit max_batch_size"),
    ("max_batch_size", {"min": 9, "max": 8, "controller": "aimd"}, "min (9) is above max (8)"),
    ("max_batch_size", {"min": 1, "max": 8, "controller": "aimd", "tolerance": -1}, "greater than or equal"),
])
def test_knob_ranges_and_controllers(knob, body, fragment):
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        PolicySpec.model_validate({"knobs": {knob: body}})


def test_every_knob_accepts_rules_and_none():
    for knob, lo, hi in [("spec_length", 0, 32), ("kv_compression", 0, 0.95), ("weight_bits", 4, 16),
                         ("max_batch_size", 1, 4096)]:
        for controller in ("rules", "none"):
            body = {"min": lo, "max": hi, "controller": controller}
            kp = PolicySpec.model_validate({"knobs": {knob: body}})
            assert kp.knobs[knob] == KnobPolicy(min=lo, max=hi, controller=controller)


@pytest.mark.parametrize(("action", "fragment"), [
    ({}, "exactly one of set, increase, decrease (got none)"),
    ({"set": {"spec_length": 2}, "decrease": {"spec_length": 1}}, "(got set and decrease)"),
    ({"set": {}}, "set names no knob"),
    ({"set": {"spec_length": "25%"}}, "set takes a value, not a percentage"),
    ({"set": {"weight_bits": 5}}, "weight_bits must be one of 4, 8, 16"),
    ({"set": {"kv_compression": 1.5}}, "kv_compression must be in 0..0.95"),
    ({"increase": {"spec_length": 0}}, "increase needs an amount above 0"),
    ({"decrease": {"max_batch_size": "150%"}}, "more than 100%"),
    ({"decrease": {"max_batch_size": "0%"}}, "above 0%"),
    ({"increase": {"max_batch_size": "lots"}}, "a percentage like '25%', got 'lots'"),
    ({"increase": {"max_batch_size": True}}, "a percentage like '25%', got True"),
    ({"increase": {"batch": 1}}, "Input should be"),
])
def test_bad_actions(action, fragment):
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        Action.model_validate(action)


def test_actions_and_percentages():
    action = Action.model_validate({"decrease": {"max_batch_size": " 25 %", "spec_length": 2}})
    assert action.op == "decrease" and action.changes == {"max_batch_size": "25%", "spec_length": 2.0}
    action = Action.model_validate({"increase": {"max_batch_size": "12.5%"}})
    assert action.changes == {"max_batch_size": "12.5%"}
    assert Action.model_validate({"set": {"weight_bits": 8}}).changes == {"weight_bits": 8.0}


def test_spec_level_checks():
    rule = {"name": "r", "when": "last(kv_usage) > 0.9", "then": {"increase": {"kv_compression": 0.1}}}
    with pytest.raises(ValidationError, match="duplicate name 'r'"):
        PolicySpec.model_validate({"rules": [rule, rule]})
    with pytest.raises(ValidationError, match="controller 'none'"):
        PolicySpec.model_validate({"rules": [rule], "knobs": {
            "kv_compression": {"min": 0, "max": 0, "controller": "none"}}})
    with pytest.raises(ValidationError, match="is a number, not a condition"):
        PolicySpec.model_validate({"rules": [{**rule, "when": "last(kv_usage)"}]})
    with pytest.raises(ValidationError, match="unknown metric 'kv'"):
        PolicySpec.model_validate({"guardrails": [{"name": "g", "when": "last(kv) > 1", "then": "veto"}]})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PolicySpec.model_validate({"rules": [{**rule, "fro": "5s"}]})
    with pytest.raises(ValidationError, match="greater than 0"):
        PolicySpec.model_validate({"evaluate_every": "0s"})
    assert PolicySpec.model_validate({"rules": [{**rule, "for": "2m"}]}).rules[0].for_ == 120.0


def test_policy_header():
    spec = {"mode": "observe"}
    ok = Policy.model_validate({"apiVersion": "optd/v1", "kind": "Policy", "metadata": {"name": "a-b.c_1"},
                                "spec": spec})
    assert ok.spec.mode == "observe" and ok.include == [] and ok.metadata.description == ""
    for bad in [{"apiVersion": "optd/v2"}, {"kind": "Pol"}, {"metadata": {"name": "a/b"}},
                {"metadata": {"name": ""}}, {"metadata": {"name": "x", "labels": {}}}]:
        with pytest.raises(ValidationError):
            Policy.model_validate({"apiVersion": "optd/v1", "kind": "Policy", "metadata": {"name": "x"},
                                   "spec": spec, **bad})


def test_policy_error_formatting():
    assert str(PolicyError("bad", "spec.rules[2].when", "p.yaml", 7)) == "p.yaml:7: spec.rules[2].when: bad"
    assert str(PolicyError("bad", "spec", "p.yaml")) == "p.yaml: spec: bad"
    assert str(PolicyError("bad")) == "bad"
    assert str(PolicyError("bad", "x", None, 3)) == "line 3: x: bad"
    e = PolicyError("bad", "spec")
    assert isinstance(e, ValueError) and e.errors == [e]
    assert (e.file, e.line, e.message) == (None, None, "bad")
