"""Damping: HPA stabilization windows, max_step, tolerance, clamping and the knobs' value spaces."""

import itertools
import random

import pytest

from optd.policies.damping import Damper, quantize, step_limit
from optd.policies.schema import Behavior, Direction


def damper(up: float = 0.0, down: float = 0.0, up_step: float | None = None,
           down_step: float | None = None) -> Damper:
    return Damper(Behavior(up=Direction(stabilization_window=up, max_step=up_step),
                           down=Direction(stabilization_window=down, max_step=down_step)))


def test_quantize_keeps_each_knob_in_its_value_space():
    # Integer knobs round in the direction of the move: any fraction of a step becomes one step.
    assert quantize("max_batch_size", 8.2, 8, 1, 64) == 9
    assert quantize("max_batch_size", 7.9, 8, 1, 64) == 7
    assert quantize("spec_length", 3.0, 5, 0, 8) == 3
    assert quantize("max_batch_size", 500, 8, 1, 64) == 64       # clamped
    assert quantize("max_batch_size", 0.3, 8, 1, 64) == 1
    # weight_bits lives on the 4/8/16 ladder, inside the bounds.
    assert quantize("weight_bits", 15, 16, 4, 16) == 8            # any decrease from 16 is a level down
    assert quantize("weight_bits", 9, 8, 4, 16) == 16
    assert quantize("weight_bits", 4, 16, 8, 16) == 8             # min 8: 4 is not allowed
    assert quantize("weight_bits", 12, 8, 4, 8) == 8              # max 8
    # kv_compression is a float, rounded to 1e-6 and clamped.
    assert quantize("kv_compression", 0.1 + 0.2, 0.0, 0, 0.95) == 0.3
    assert quantize("kv_compression", 1.2, 0.5, 0, 0.75) == 0.75


def test_step_limit_units():
    assert step_limit("max_batch_size", 10, 30, 4, 1, 64) == 14
    assert step_limit("max_batch_size", 10, 2, 4, 1, 64) == 6
    assert step_limit("max_batch_size", 10, 30, 0.5, 1, 64) == 11   # integer knobs move at least 1
    assert step_limit("kv_compression", 0.0, 0.75, 0.25, 0, 0.95) == 0.25
    assert step_limit("weight_bits", 16, 4, 1, 4, 16) == 8           # max_step counts ladder levels
    assert step_limit("weight_bits", 16, 4, 2, 4, 16) == 4
    assert step_limit("spec_length", 2, 6, None, 0, 8) == 6


def test_up_window_uses_the_lowest_recommendation_in_it():
    d = damper(up=30)
    # A single spike up does not move: the window also holds the recommendation "stay" from before.
    assert d.damp("spec_length", 0, 2, 2, lo=0, hi=8).value == 2
    r = d.damp("spec_length", 5, 2, 6, lo=0, hi=8)
    assert r.value == 2 and "up stabilization window" in r.held_by
    # Still wanting more 30s after the last "stay": move, but only as far as the most modest of them.
    for t, rec in ((10, 5), (15, 6), (20, 7), (25, 6)):
        assert d.damp("spec_length", t, 2, rec, lo=0, hi=8).value == 2
    r = d.damp("spec_length", 30, 2, 8, lo=0, hi=8)   # window (0, 30]: 6, 5, 6, 7, 6, 8 -> lowest 5
    assert r.value == 5 and "stabilization window" in r.limited_by


def test_down_window_uses_the_highest_recommendation_in_it():
    d = damper(down=60)
    assert d.damp("max_batch_size", 0, 32, 32, lo=1, hi=64).value == 32
    for t in range(10, 60, 10):
        assert d.damp("max_batch_size", t, 32, 8 + t / 10, lo=1, hi=64).value == 32
    # At t=60 the "stay at 32" from t=0 has left the window; the highest left is 13.
    assert d.damp("max_batch_size", 60, 32, 9, lo=1, hi=64).value == 13


def test_urgent_skips_the_window_and_max_step():
    d = damper(down=120, down_step=4)
    d.damp("max_batch_size", 0, 32, 32, lo=1, hi=64)
    assert d.damp("max_batch_size", 5, 32, 16, lo=1, hi=64).value == 32
    assert d.damp("max_batch_size", 10, 32, 20, lo=1, hi=64).value == 32  # not urgent: held
    r = d.damp("max_batch_size", 15, 32, 16, lo=1, hi=64, urgent=True)
    assert r.value == 16 and r.limited_by is None
    assert d.damp("max_batch_size", 20, 32, 0, lo=1, hi=64, urgent=True).value == 1  # still clamped


def test_tolerance_and_no_change():
    d = damper()
    r = d.damp("kv_compression", 0, 0.5, 0.55, lo=0, hi=0.95, tolerance=0.1)
    assert r.value == 0.5 and "tolerance" in r.held_by
    assert d.damp("kv_compression", 5, 0.5, 0.75, lo=0, hi=0.95, tolerance=0.1).value == 0.75
    r = d.damp("kv_compression", 10, 0.5, 0.5, lo=0, hi=0.95)
    assert r.value == 0.5 and r.held_by is None


def test_out_of_bounds_current_is_brought_inside_at_once():
    # Bounds are constraints, not recommendations: max_step and the window do not keep a knob outside.
    d = damper(down=120, down_step=2)
    assert d.damp("max_batch_size", 0, 20, 20, lo=1, hi=16).value == 16
    assert d.damp("weight_bits", 0, 16, 16, lo=4, hi=8).value == 8


def count_reversals(values: list[float]) -> int:
    moves = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


@pytest.mark.parametrize("seed", range(5))
def test_noisy_recommendations_do_not_flap(seed):
    """Recommendations jumping around 16 +- 6 every 5s for an hour: undamped, the knob follows the noise;
    damped, each reversal needs a full window of agreement, so there are at most one per window."""
    rng = random.Random(seed)
    recs = [16 + rng.uniform(-6, 6) for _ in range(720)]
    runs = {}
    for name, (up, down) in {"undamped": (0, 0), "damped": (30, 120)}.items():
        d, value, values = damper(up=up, down=down, up_step=2, down_step=2), 16.0, [16.0]
        for i, rec in enumerate(recs):
            value = d.damp("max_batch_size", i * 5.0, value, rec, lo=1, hi=64).value
            assert 1 <= value <= 64 and value == int(value)
            values.append(value)
        runs[name] = count_reversals(values)
    assert runs["undamped"] > 100
    # An up->down pair of reversals takes at least the down window, a down->up one the up window.
    assert runs["damped"] <= 2 * 3600 / (30 + 120) + 1
