"""The expression language: parsing, load-time checks, and evaluation against known numbers."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optd.policies.errors import PolicyError
from optd.policies.expressions import compile_expression, percentile
from optd.policies.metrics import METRIC_NAMES
from optd.policies.window import SampleSeries


@pytest.fixture
def series() -> SampleSeries:
    # ts 100..109; kv_usage climbs 0.50, 0.55, ... 0.95; requests_waiting has no data in the last sample.
    samples = [{"ts": 100.0 + i, "kv_usage": 0.5 + 0.05 * i, "requests_waiting": float(i), "itl_p95": 0.05}
               for i in range(10)]
    samples[-1]["requests_waiting"] = None
    return SampleSeries(samples)


def ev(text: str, window, now=None, slo=None):
    return compile_expression(text, "spec.rules[0].when", slo=slo).evaluate(window, now)


def test_window_functions_on_known_numbers(series):
    assert ev("last(kv_usage)", series) == pytest.approx(0.95)
    assert ev("kv_usage", series) == pytest.approx(0.95)  # a bare name is last()
    assert ev("last(requests_waiting)", series) == 8.0    # the newest value that is not None
    # 3s window at now=109: ts 107, 108, 109 (106 is not inside: now - seconds < ts).
    assert ev("avg(kv_usage, 3s)", series) == pytest.approx((0.85 + 0.9 + 0.95) / 3)
    assert ev("min(kv_usage, 3s)", series) == pytest.approx(0.85)
    assert ev("max(kv_usage, 3000ms)", series) == pytest.approx(0.95)
    assert ev("p50(kv_usage, 1m)", series) == pytest.approx(0.725)
    assert ev("p95(kv_usage, 1m)", series) == pytest.approx(0.5 + 0.05 * 8.55)
    assert ev("p99(requests_waiting, 1h)", series) == pytest.approx(7.92)  # 0..8: 9 values
    # rate: change per second between the oldest and newest values in the window.
    assert ev("rate(kv_usage, 5s)", series) == pytest.approx(0.05)
    assert ev("rate(requests_waiting, 1m)", series) == pytest.approx(1.0)
    # an explicit `now` moves the window back in time.
    assert ev("avg(kv_usage, 2s)", series, now=101.0) == pytest.approx(0.525)
    assert ev("rate(kv_usage, 4s)", series, now=103.0) == pytest.approx(0.05)


def test_arithmetic_comparisons_and_logic(series):
    assert ev("avg(kv_usage, 30s) > 0.7 and last(requests_waiting) > 0", series) is True
    assert ev("avg(kv_usage, 30s) > 0.8 or not last(kv_usage) < 0.9", series) is True
    assert ev("(last(kv_usage) - 0.45) * 2 / 4", series) == pytest.approx(0.25)
    assert ev("-last(kv_usage) + 1", series) == pytest.approx(0.05)
    assert ev("0.5 < last(kv_usage) <= 0.95", series) is True
    assert ev("0.5 < last(kv_usage) < 0.9", series) is False
    assert ev("30s == 30 and 5m == 300 and 800ms < 1 and 1.5h == 5400", series) is True
    assert ev("last(requests_waiting) != 8", series) is False


def test_slo_values_come_from_the_bound_slo(series):
    assert ev("last(itl_p95) < slo.itl_p95", series, slo={"itl_p95": 0.06}) is True
    assert ev("last(itl_p95) > slo.itl_p95 * 0.5", series, slo={"itl_p95": 0.06}) is True
    # an SLO that is not set reads as no data
    assert ev("last(itl_p95) < slo.ttft_p95", series, slo={"itl_p95": 0.06}) is None
    expr = compile_expression("last(itl_p95) < slo.itl_p95", slo={"itl_p95": 0.01})
    assert expr.evaluate(series) is False
    assert expr.evaluate(series, slo={"itl_p95": 1.0}) is True


def test_missing_data_is_none_and_three_valued(series):
    empty = SampleSeries([])
    assert ev("last(kv_usage) > 0.5", empty) is None
    assert ev("avg(kv_usage, 30s) > 0.5", empty) is None
    assert ev("rate(kv_usage, 30s)", empty) is None
    assert ev("last(quality_top1) < 0.97", series) is None              # never sampled
    assert ev("last(quality_top1) < 0.97 or last(kv_usage) > 0.9", series) is True
    assert ev("last(quality_top1) < 0.97 or last(kv_usage) > 0.99", series) is None
    assert ev("last(quality_top1) < 0.97 and last(kv_usage) > 0.99", series) is False
    assert ev("not last(quality_top1) < 0.97", series) is None
    assert ev("last(kv_usage) / (last(kv_usage) - last(kv_usage))", series) is None  # division by zero
    assert ev("avg(kv_usage, 1s)", series, now=50.0) is None  # window before the first sample
    assert ev("rate(kv_usage, 1s)", series) is None           # one point: no rate


def test_metrics_and_kind():
    expr = compile_expression("avg(kv_usage, 30s) > 0.9 and last(requests_waiting) > 0 and spec_length < 4")
    assert expr.metrics == {"kv_usage", "requests_waiting", "spec_length"}
    assert expr.is_condition and expr.text.startswith("avg(")
    assert not compile_expression("rate(tokens_per_s, 1m) * 2").is_condition


@pytest.mark.parametrize(("text", "fragment"), [
    ("avg(kv_usag, 30s) > 1", "unknown metric 'kv_usag'"),
    ("ts > 0", "unknown metric 'ts'"),
    ("sum(kv_usage, 30s) > 1", "unknown function 'sum'"),
    ("avg(kv_usage) > 1", "avg() takes 2 arguments"),
    ("last(kv_usage, 30s) > 1", "last() takes 1 argument"),
    ("avg(kv_usage, kv_usage) > 1", "window of avg() must be a duration"),
    ("avg(kv_usage, 0s) > 1", "longer than 0s"),
    ("avg(30s, 30s) > 1", "expected a metric name"),
    ("avg(kv_usage + 1, 30s) > 1", "expected a metric name"),
    ("avg(kv_usage, window=30s) > 1", "positional arguments only"),
    ("last(kv_usage) >", "malformed expression"),
    ("last(kv_usage) > 0.9 and", "malformed expression"),
    ("30 parsecs > 1", "malformed expression"),
    ("'abc' == 1", "'abc' is not allowed"),
    ("True", "True is not allowed"),
    ("kv_usage.real > 1", "attribute access is not allowed"),
    ("slo.foo > 1", "unknown SLO 'foo'"),
    ("slo > 1", "use slo.<name>"),
    ("__import__('os').system('true')", "unknown function"),
    ("(lambda: 1)()", "unknown function"),
    ("[1][0] > 0", "not allowed"),
    ("kv_usage ** 2 > 1", "only + - * /"),
    ("kv_usage in kv_usage", "not allowed"),
    ("(kv_usage > 1) + 1 > 0", "+ needs a number, got a condition"),
    ("kv_usage and kv_usage > 1", "and needs a condition, got a number"),
    ("not kv_usage", "not needs a condition"),
    ("__optd_d0 > 1", "reserved"),
    ("9" * 400 + " > 1", "number too large"),
    ("1e999 > 1", "numbers must be finite"),
    ("9" * 400 + "s > 1", "is too large"),
    ("not " * 100 + "kv_usage > 1", "nests deeper"),
    ("1 + " * 2000 + "1", "longer than"),
])
def test_rejected_at_compile_time_naming_the_path(text, fragment):
    with pytest.raises(PolicyError) as info:
        compile_expression(text, "spec.rules[3].when")
    assert info.value.path == "spec.rules[3].when"
    assert fragment in info.value.message
    assert str(info.value).startswith("spec.rules[3].when: ")


def test_durations_do_not_touch_names():
    # p95, itl_p95 and preemptions_per_s contain digits and unit letters next to each other.
    expr = compile_expression("p95(itl_p95, 10s) > 2ms and last(preemptions_per_s) < 1h")
    assert expr.metrics == {"itl_p95", "preemptions_per_s"}
    series = SampleSeries([{"ts": 1.0, "itl_p95": 0.003, "preemptions_per_s": 0.0}])
    assert expr.evaluate(series) is True


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


_atoms = st.one_of(
    st.sampled_from([*METRIC_NAMES, "slo.itl_p95", "nope", "ts", "30s", "5m", "800ms", "x1"]),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(repr),
    st.builds(lambda f, m, w: f"{f}({m}, {w})", st.sampled_from(["avg", "p95", "rate", "max", "sum"]),
              st.sampled_from([*METRIC_NAMES[:5], "bogus"]), st.sampled_from(["30s", "0s", "2", "kv_usage"])),
)
_expressions = st.recursive(
    _atoms,
    lambda inner: st.one_of(
        st.builds(lambda a, op, b: f"{a} {op} {b}", inner,
                  st.sampled_from(["+", "-", "*", "/", "<", ">=", "==", "and", "or", "**", "%"]), inner),
        st.builds(lambda a: f"not {a}", inner),
        st.builds(lambda a: f"({a})", inner),
        st.builds(lambda a: f"last({a})", inner),
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(_expressions, st.text(max_size=40)))
def test_any_text_compiles_or_is_a_policy_error_and_evaluates_safely(text):
    try:
        expr = compile_expression(text, "spec.guardrails[0].when")
    except PolicyError as e:
        assert e.path == "spec.guardrails[0].when"
        return
    series = SampleSeries([{"ts": float(t), **{m: float(t % 3) for m in METRIC_NAMES}} for t in range(5)])
    value = expr.evaluate(series, slo={"itl_p95": 0.05})
    assert value is None or isinstance(value, bool | float)
    assert expr.metrics <= set(METRIC_NAMES)


def test_last_reads_no_sample_after_now():
    """A replay holds samples from its future: `last` at a past `now` must not read them."""
    series = SampleSeries([{"ts": float(t), "tokens_per_s": 10.0 * t} for t in (1, 2, 3)])
    expr = compile_expression("last(tokens_per_s)")
    assert expr.evaluate(series, now=2.0) == 20.0
    assert expr.evaluate(series) == 30.0
    assert compile_expression("tokens_per_s > 15").evaluate(series, now=1.5) is False
