"""The evaluator: guardrails, rules (`for:`, cooldown, actions), precedence, overrides, outcomes and
determinism."""

import dataclasses
import random
import textwrap

import pytest

from optd.engine.knobs import Knobs
from optd.policies.decision import Decision
from optd.policies.evaluator import PolicyEvaluator
from optd.policies.loader import load_policy, parse_policy
from optd.policies.window import SampleSeries

HEAD = """\
apiVersion: optd/v1
kind: Policy
metadata: {name: t}
spec:
  evaluate_every: 5s
"""


def policy(body: str):
    return parse_policy(HEAD + textwrap.indent(textwrap.dedent(body), "  "))


class Loop:
    """Drives an evaluator the way the daemon does: a sample per call, then a tick; decisions whose outcome
    is "applied" change the knobs (unless `reject` names the knob), and every decision is handed back."""

    def __init__(self, loaded, knobs: Knobs | None = None, bounds=None):
        self.evaluator = PolicyEvaluator(loaded, bounds)
        self.series, self.knobs = SampleSeries(), knobs or Knobs()
        self.decisions: list[Decision] = []
        self.pinned: set[str] = set()
        self.paused = False
        self.unsupported: set[str] = set()
        self.reject: set[str] = set()

    def tick(self, t: float, **metrics) -> list[Decision]:
        self.series.append({"ts": t, **metrics, **dataclasses.asdict(self.knobs)})
        out = []
        decisions = self.evaluator.evaluate(self.series, self.knobs, t, self.pinned, self.paused,
                                            self.unsupported)
        for d in decisions:
            if d.outcome == "applied":
                if d.knob in self.reject:
                    d = d.model_copy(update={"outcome": "rejected", "reason": "engine said no"})
                else:
                    kind = type(getattr(self.knobs, d.knob))
                    self.knobs = dataclasses.replace(self.knobs, **{d.knob: kind(d.new)})
            self.evaluator.record_outcome(d)
            self.decisions.append(d)
            out.append(d)
        return out


def moves(decisions):
    return [(d.knob, d.old, d.new, d.outcome) for d in decisions]


QUALITY = """\
guardrails:
  - {name: quality, when: "last(quality_top1) < 0.97", then: rollback, cooldown: 60s}
knobs:
  kv_compression: {min: 0, max: 0.75, controller: rules}
  weight_bits: {min: 4, max: 16, controller: rules}
behavior: {up: {stabilization_window: 0s}, down: {stabilization_window: 0s}}
rules:
  - {name: squeeze-kv, when: "last(kv_usage) > 0.9", then: {increase: {kv_compression: 0.25}}, cooldown: 10s}
  - {name: fewer-bits, when: "last(itl_p95) > 0.06", then: {set: {weight_bits: 8}}}
"""


def test_rollback_undoes_the_last_quality_change_and_holds_it():
    loop = Loop(policy(QUALITY))
    good = {"quality_top1": 0.99}
    assert moves(loop.tick(0, kv_usage=0.95, itl_p95=0.03, **good)) == [
        ("kv_compression", 0, 0.25, "applied")]
    assert moves(loop.tick(5, kv_usage=0.5, itl_p95=0.08, **good)) == [("weight_bits", 16, 8, "applied")]
    # Quality drops: the most recent quality-lowering change (weight_bits) is undone, and only that.
    out = loop.tick(10, kv_usage=0.95, itl_p95=0.08, quality_top1=0.9)
    # squeeze-kv fired too (out of its cooldown): while quality is bad the guardrail vetoes it.
    assert moves(out) == [("weight_bits", 8, 16, "applied"), ("kv_compression", 0.25, 0.5, "held")]
    assert out[0].source == "guardrail:quality" and out[0].inputs == {"quality_top1": 0.9}
    assert "undo weight_bits 16 -> 8" in out[0].reason
    # weight_bits is held for the cooldown: fewer-bits keeps firing, nothing moves it, nothing is logged.
    for t in range(15, 70, 5):
        out = loop.tick(t, kv_usage=0.5, itl_p95=0.08, quality_top1=0.99)
        assert not [d for d in out if d.knob == "weight_bits"], t
    assert loop.knobs.weight_bits == 16
    out = loop.tick(70, kv_usage=0.5, itl_p95=0.08, quality_top1=0.99)
    assert moves(out) == [("weight_bits", 16, 8, "applied")]


def test_rollback_cooldown_then_the_next_change_down_the_stack():
    loop = Loop(policy(QUALITY))
    loop.tick(0, kv_usage=0.95, itl_p95=0.03, quality_top1=0.99)
    loop.tick(5, kv_usage=0.5, itl_p95=0.08, quality_top1=0.99)
    assert moves(loop.tick(10, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9))[0][:3] == ("weight_bits", 8, 16)
    # Quality still bad (the probe has not rerun): no further undo during the 60s cooldown...
    for t in range(15, 70, 5):
        assert loop.tick(t, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9) == []
    # ...then the next change down the stack.
    assert moves(loop.tick(70, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9)) == [
        ("kv_compression", 0.25, 0.0, "applied")]
    # Nothing left to undo: the guardrail fires and records nothing.
    assert loop.tick(135, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9) == []


def test_rollback_leaves_operator_changes_and_quality_raising_changes_alone():
    loop = Loop(policy(QUALITY), Knobs(weight_bits=8))
    loop.tick(0, kv_usage=0.95, itl_p95=0.03, quality_top1=0.99)            # kv 0 -> 0.25
    loop.knobs = dataclasses.replace(loop.knobs, kv_compression=0.5)         # an operator moved it since
    assert loop.tick(5, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9) == []  # not the policy's value


def test_veto_blocks_quality_lowering_moves_only():
    loop = Loop(policy("""\
        guardrails:
          - {name: hold-quality, when: "last(quality_kl) > 0.05", then: veto}
        knobs:
          kv_compression: {min: 0, max: 0.75, controller: rules}
          max_batch_size: {min: 1, max: 64, controller: rules}
        behavior: {up: {stabilization_window: 0s}, down: {stabilization_window: 0s}}
        rules:
          - name: squeeze
            when: "last(kv_usage) > 0.9"
            then: {increase: {kv_compression: 0.25, max_batch_size: 2}}
          - {name: relax, when: "last(kv_usage) < 0.2", then: {decrease: {kv_compression: 0.25}}}
        """), Knobs(kv_compression=0.5, max_batch_size=8))
    out = loop.tick(0, kv_usage=0.95, quality_kl=0.1)
    assert moves(out) == [("kv_compression", 0.5, 0.75, "held"), ("max_batch_size", 8, 10, "applied")]
    assert out[0].source == "guardrail:hold-quality" and "vetoed" in out[0].reason
    # Still vetoed: not logged again; batch size is not quality-affecting and keeps moving.
    assert moves(loop.tick(5, kv_usage=0.95, quality_kl=0.1)) == [("max_batch_size", 10, 12, "applied")]
    # Less compression raises quality: never vetoed.
    assert moves(loop.tick(10, kv_usage=0.1, quality_kl=0.1)) == [("kv_compression", 0.5, 0.25, "applied")]
    # Veto gone: compression may grow again.
    assert moves(loop.tick(15, kv_usage=0.95, quality_kl=0.01))[0] == ("kv_compression", 0.25, 0.5, "applied")


RULES = """\
knobs:
  max_batch_size: {min: 1, max: 64, controller: rules}
behavior: {up: {stabilization_window: 0s}, down: {stabilization_window: 0s}}
rules:
  - name: grow
    when: "last(requests_waiting) > 0"
    for: 15s
    then: {increase: {max_batch_size: 50%}}
    cooldown: 20s
  - {name: shrink, when: "last(itl_p95) > 0.1", then: {decrease: {max_batch_size: 25%}}}
  - {name: reset, when: "last(gpu_util) < 0.01", then: {set: {max_batch_size: 4}}}
"""


def test_for_sustain_has_prometheus_semantics():
    loop = Loop(policy(RULES), Knobs(max_batch_size=8))
    for t in (0, 5):
        assert loop.tick(t, requests_waiting=3.0) == []
    assert loop.tick(10, requests_waiting=0.0) == []        # false: the pending timer resets
    for t in (15, 20, 25):
        assert loop.tick(t, requests_waiting=3.0) == []
    out = loop.tick(30, requests_waiting=3.0)               # true at 15, 20, 25, 30: held for 15s
    assert moves(out) == [("max_batch_size", 8, 12, "applied")]
    assert "held for 15s" in out[0].reason and out[0].source == "policy:t/grow"
    assert out[0].inputs == {"requests_waiting": 3.0}


def test_no_data_resets_the_for_timer():
    loop = Loop(policy("""\
        knobs:
          max_batch_size: {min: 1, max: 64, controller: rules}
        behavior: {up: {stabilization_window: 0s}}
        rules:
          - {name: busy, when: "avg(gpu_util, 4s) > 0.5", for: 10s, then: {increase: {max_batch_size: 1}}}
        """), Knobs(max_batch_size=8))
    assert loop.tick(0, gpu_util=0.9) == []
    assert loop.tick(5) == []              # no gpu_util in the last 4s: None, not true
    assert loop.tick(10, gpu_util=0.9) == []
    assert loop.tick(15, gpu_util=0.9) == []
    assert moves(loop.tick(20, gpu_util=0.9)) == [("max_batch_size", 8, 9, "applied")]


def test_cooldown_and_actions():
    loop = Loop(policy(RULES), Knobs(max_batch_size=8))
    for t in range(0, 15, 5):
        loop.tick(t, requests_waiting=3.0)
    assert moves(loop.tick(15, requests_waiting=3.0)) == [("max_batch_size", 8, 12, "applied")]
    for t in (20, 25, 30):                                  # cooldown 20s
        assert loop.tick(t, requests_waiting=3.0) == []
    assert moves(loop.tick(35, requests_waiting=3.0)) == [("max_batch_size", 12, 18, "applied")]
    # decrease 25% of 18 = 4.5: rounds in the direction of the move, to 13.
    assert moves(loop.tick(40, itl_p95=0.2)) == [("max_batch_size", 18, 13, "applied")]
    # (last(m) is the newest value there is: itl_p95 must be given as fine again, or shrink fires first.)
    assert moves(loop.tick(45, gpu_util=0.0, itl_p95=0.01)) == [("max_batch_size", 13, 4, "applied")]
    # Clamped to max: 50% of 60 would be 90.
    loop.knobs = Knobs(max_batch_size=60)
    fine = {"itl_p95": 0.01, "gpu_util": 0.5}
    out = [d for t in range(50, 75, 5) for d in loop.tick(t, requests_waiting=3.0, **fine)]
    assert moves(out) == [("max_batch_size", 60, 64, "applied")]


def test_first_firing_rule_wins_over_later_rules_and_the_controller():
    loop = Loop(policy("""\
        slo: {itl_p95: 60ms}
        knobs:
          max_batch_size: {min: 1, max: 64, controller: aimd}
        behavior: {up: {stabilization_window: 0s}, down: {stabilization_window: 0s}}
        rules:
          - {name: cap, when: "last(gpu_power_w) > 300", then: {set: {max_batch_size: 6}}}
          - {name: floor, when: "last(gpu_power_w) > 100", then: {set: {max_batch_size: 2}}}
        """), Knobs(max_batch_size=16))
    out = loop.tick(0, gpu_power_w=400.0, itl_p95=0.2, requests_waiting=1.0)
    assert moves(out) == [("max_batch_size", 16, 6, "applied")] and out[0].source == "policy:t/cap"
    out = loop.tick(5, gpu_power_w=50.0, itl_p95=0.2, requests_waiting=1.0)     # no rule: aimd halves
    assert moves(out) == [("max_batch_size", 6, 3, "applied")] and out[0].source == "policy:t/aimd"


def test_a_firing_rule_held_by_damping_is_recorded_once():
    loop = Loop(policy("""\
        knobs:
          max_batch_size: {min: 1, max: 64, controller: rules}
        behavior: {up: {stabilization_window: 30s}, down: {stabilization_window: 20s}}
        rules:
          - {name: up, when: "last(requests_waiting) > 0", then: {set: {max_batch_size: 12}}}
          - {name: down, when: "last(itl_p95) > 0.1", then: {set: {max_batch_size: 4}}}
        """), Knobs(max_batch_size=8))
    out = loop.tick(0, requests_waiting=2.0)   # nothing recommended before: the window holds only this
    assert moves(out) == [("max_batch_size", 8, 12, "applied")]
    out = loop.tick(5, itl_p95=0.2, requests_waiting=0.0)
    assert moves(out) == [("max_batch_size", 12, 4, "held")]
    assert "down stabilization window 20s" in out[0].reason
    for t in (10, 15):
        assert loop.tick(t, itl_p95=0.2) == []
    # At 20 the window (0, 20] holds only "4": the "12" recommended at 0 has left it.
    assert moves(loop.tick(20, itl_p95=0.2)) == [("max_batch_size", 12, 4, "applied")]


AIMD = """\
slo: {itl_p95: 60ms}
knobs:
  max_batch_size: {min: 1, max: 64, controller: aimd}
behavior: {up: {stabilization_window: 0s}, down: {stabilization_window: 0s}}
"""


def test_pinned_knob_is_never_moved_and_recorded_only_when_it_would_have_moved():
    loop = Loop(policy(AIMD), Knobs(max_batch_size=32))
    loop.pinned = {"max_batch_size"}
    assert loop.tick(0, itl_p95=0.03, requests_waiting=0.0) == []          # would hold: nothing recorded
    out = loop.tick(5, itl_p95=0.2, requests_waiting=0.0)
    assert moves(out) == [("max_batch_size", 32, 16, "pinned")]
    assert loop.tick(10, itl_p95=0.2, requests_waiting=0.0) == []         # same again: not repeated
    assert loop.knobs.max_batch_size == 32
    loop.pinned = set()
    assert moves(loop.tick(15, itl_p95=0.2, requests_waiting=0.0)) == [("max_batch_size", 32, 16, "applied")]


def test_paused_and_observe_compute_but_apply_nothing():
    loop = Loop(policy(AIMD), Knobs(max_batch_size=32))
    loop.paused = True
    assert moves(loop.tick(0, itl_p95=0.2)) == [("max_batch_size", 32, 16, "paused")]
    assert loop.tick(5, itl_p95=0.2) == []
    assert loop.knobs.max_batch_size == 32
    # Still paused 10 minutes later: recorded once more, as a reminder.
    assert moves(loop.tick(605, itl_p95=0.2)) == [("max_batch_size", 32, 16, "paused")]
    loop.paused = False
    assert moves(loop.tick(610, itl_p95=0.2)) == [("max_batch_size", 32, 16, "applied")]

    observing = Loop(policy("mode: observe\n" + AIMD), Knobs(max_batch_size=32))
    assert moves(observing.tick(0, itl_p95=0.2)) == [("max_batch_size", 32, 16, "observe")]
    assert observing.tick(5, itl_p95=0.2) == []
    # 40s later the breach is out of the lookback: now it would climb.
    out = observing.tick(45, itl_p95=0.03, requests_waiting=3.0)
    assert moves(out) == [("max_batch_size", 32, 33, "observe")]
    assert observing.knobs.max_batch_size == 32


def test_unsupported_knob_is_reported_once_and_skipped():
    loop = Loop(policy(QUALITY))
    loop.unsupported = {"weight_bits"}
    out = loop.tick(0, itl_p95=0.08, kv_usage=0.5)
    assert moves(out) == [("weight_bits", 16, None, "rejected")] and "does not support" in out[0].reason
    for t in (5, 10):
        assert loop.tick(t, itl_p95=0.08, kv_usage=0.5) == []


def test_rejected_change_is_not_asked_again_for_a_while():
    loop = Loop(policy(AIMD), Knobs(max_batch_size=32))
    loop.reject = {"max_batch_size"}
    assert moves(loop.tick(0, itl_p95=0.2)) == [("max_batch_size", 32, 16, "rejected")]
    for t in range(5, 60, 5):
        assert loop.tick(t, itl_p95=0.2) == [], t
    loop.reject = set()
    assert moves(loop.tick(60, itl_p95=0.2)) == [("max_batch_size", 32, 16, "applied")]


def test_engine_bounds_narrow_the_policy():
    loop = Loop(policy(AIMD.replace("stabilization_window: 0s}", "stabilization_window: 0s, max_step: 8}")),
                Knobs(max_batch_size=8), bounds={"max_batch_size": (1, 12)})
    assert moves(loop.tick(0, itl_p95=0.03, requests_waiting=5.0)) == [("max_batch_size", 8, 12, "applied")]
    assert loop.tick(5, itl_p95=0.03, requests_waiting=5.0) == []


def test_aimd_does_not_halve_twice_for_one_breach():
    """After a halving, only samples taken under the new batch size count: the breach measured before it
    does not cut again."""
    loop = Loop(policy(AIMD), Knobs(max_batch_size=64))
    for t in range(0, 30):
        loop.series.append({"ts": float(t), "itl_p95": 0.09, "max_batch_size": 64})
    assert moves(loop.tick(30, itl_p95=0.09)) == [("max_batch_size", 64, 32, "applied")]
    assert loop.tick(35, itl_p95=0.04, requests_waiting=0.0) == []


def scenario(seed: int) -> list[dict]:
    """The balanced preset against a changing plant with noise, pins, a pause and a quality dip."""
    loop = Loop(load_policy("balanced"), Knobs(spec_length=0, max_batch_size=8),
                bounds={"max_batch_size": (1, 64), "spec_length": (0, 8)})
    rng = random.Random(seed)
    for t in range(0, 1800):
        k, b = loop.knobs, loop.knobs.max_batch_size
        sample = {"itl_p95": (0.02 + 0.001 * b) * rng.uniform(0.9, 1.1), "ttft_p95": 0.3,
                  "requests_waiting": float(rng.choice([0, 4, 8])), "requests_running": float(b),
                  "kv_usage": min(1.0, 0.6 + t / 2000 - k.kv_compression), "preemptions_per_s": 0.0,
                  "quality_top1": 0.9 if 900 <= t < 960 else 0.99, "quality_kl": 0.01,
                  f"step_time_k{k.spec_length}": 0.02 * (1 + 0.2 * k.spec_length)}
        for j in range(1, k.spec_length + 1):
            sample[f"spec_accept_pos{j}"] = 0.8 ** j * rng.uniform(0.9, 1.1)
        loop.pinned = {"spec_length"} if 600 <= t < 700 else set()
        loop.paused = 1200 <= t < 1300
        if t % 5:
            loop.series.append({"ts": float(t), **sample, **dataclasses.asdict(loop.knobs)})
        else:
            loop.tick(float(t), **sample)
    return [d.model_dump() for d in loop.decisions]


def test_replay_with_a_fresh_evaluator_gives_identical_decisions():
    first, second = scenario(7), scenario(7)
    assert first == second
    outcomes = {d["outcome"] for d in first}
    knobs = {d["knob"] for d in first}
    assert {"applied"} <= outcomes and len(first) > 10
    assert {"spec_length", "max_batch_size", "kv_compression"} <= knobs
    assert any(d["source"] == "guardrail:quality" for d in first)
    assert first != scenario(8)     # the decisions do depend on the data


def test_decision_summary_reads_well():
    d = Decision(ts=0, knob="max_batch_size", old=32, new=16, source="policy:t/aimd", reason="ITL high",
                 outcome="applied")
    assert d.summary() == "1970-01-01 00:00:00 max_batch_size 32 -> 16 [applied] policy:t/aimd: ITL high"
    with pytest.raises(ValueError, match="outcome"):
        Decision(ts=0, knob="x", old=1, new=2, source="s", reason="r", outcome="done")


def test_goodput_searches_only_what_the_engine_allows():
    # k=6 would be best over 0..8, but the engine speculates at most 3 tokens: the best of 0..3 is 3.
    loop = Loop(policy("""\
        knobs:
          spec_length: {min: 0, max: 8, controller: goodput}
        behavior: {up: {stabilization_window: 0s}}
        """), Knobs(spec_length=1), bounds={"spec_length": (0, 3)})
    metrics = {f"spec_accept_pos{j}": 0.9 ** j for j in range(1, 9)}
    metrics |= {f"step_time_k{k}": 0.02 * (1 + 0.1 * k) for k in range(9)}
    out = loop.tick(0, **metrics)
    assert moves(out) == [("spec_length", 1, 3, "applied")] and "k=3 maximizes" in out[0].reason


def test_a_rollback_the_engine_rejects_is_tried_again_later():
    loop = Loop(policy(QUALITY))
    assert moves(loop.tick(0, kv_usage=0.5, itl_p95=0.08, quality_top1=0.99)) == [
        ("weight_bits", 16, 8, "applied")]
    loop.reject = {"weight_bits"}
    assert moves(loop.tick(5, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9)) == [
        ("weight_bits", 8, 16, "rejected")]
    for t in range(10, 65, 5):
        assert loop.tick(t, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9) == [], t
    loop.reject = set()
    assert moves(loop.tick(65, kv_usage=0.5, itl_p95=0.03, quality_top1=0.9)) == [
        ("weight_bits", 8, 16, "applied")]
