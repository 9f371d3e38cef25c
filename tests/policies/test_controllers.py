"""Controllers on synthetic series: each alone (what it recommends and why), then in closed loop through the
evaluator against a small plant model: converges on a steady series, does not flap on a noisy one, never
leaves the policy's min/max."""

import dataclasses
import itertools
import math
import operator
import random
from collections.abc import Callable

import pytest

from optd.engine.knobs import Knobs
from optd.policies.controllers import (
    AimdController,
    ControllerInput,
    GoodputController,
    KvCompressionController,
    WeightBitsController,
    acceptance_rate_of,
    expected_tokens_alpha,
)
from optd.policies.decision import Decision
from optd.policies.evaluator import PolicyEvaluator
from optd.policies.loader import parse_policy
from optd.policies.schema import KnobPolicy, Slo
from optd.policies.window import SampleSeries


def steady(n: int = 30, t0: float = 0.0, **metrics) -> SampleSeries:
    """n one-second samples ending at t0 + n - 1 with constant metrics."""
    return SampleSeries([{"ts": t0 + i, **metrics} for i in range(n)])


def ctx(window, current, lo, hi, controller, slo=None, now=None, since=-math.inf, knobs=None, step_up=None):
    now = window.samples()[-1]["ts"] if now is None else now
    return ControllerInput(window=window, now=now, current=current,
                           bounds=KnobPolicy(min=lo, max=hi, controller=controller), slo=slo or Slo(),
                           since=since, knobs=knobs or Knobs(), step_up=step_up)


# --- goodput ------------------------------------------------------------------------------------------------


def brute_force_best(survival: list[float], times: dict[int, float], ks) -> int:
    best, best_rate = None, -1.0
    for k in ks:   # ascending: a tie keeps the smaller k
        rate = (1 + sum(survival[:k])) / times[k]
        if rate > best_rate + 1e-12:
            best, best_rate = k, rate
    return best


@pytest.mark.parametrize("seed", range(12))
def test_goodput_picks_the_brute_force_best_k(seed):
    rng = random.Random(seed)
    survival, a = [], 1.0
    for _ in range(8):
        a *= rng.uniform(0.2, 0.97)
        survival.append(a)
    t0, per_draft = rng.uniform(0.005, 0.05), rng.uniform(0.01, 0.6)
    times = {k: t0 * (1 + per_draft * k) * rng.uniform(0.97, 1.03) for k in range(9)}
    metrics = {f"spec_accept_pos{j}": v for j, v in enumerate(survival, 1)}
    metrics |= {f"step_time_k{k}": t for k, t in times.items()}
    lo, hi = rng.choice([(0, 8), (0, 4), (2, 8)])
    best = brute_force_best(survival, times, range(lo, hi + 1))
    current = float(lo if best != lo else hi)   # never already at the answer
    rec = GoodputController(hysteresis=0).recommend(ctx(steady(**metrics), current, lo, hi, "goodput"))
    assert rec.value == best, rec.reason
    assert rec.inputs[f"tokens_per_s_k{best}"] == pytest.approx((1 + sum(survival[:best])) / times[best])


def test_goodput_picks_k0_when_speculation_does_not_pay():
    # 30% acceptance and drafts costing half a target step each: plain decoding is best.
    metrics = {"spec_accept_pos1": 0.3, "spec_accept_pos2": 0.09, "step_time_k0": 0.02,
               "step_time_k1": 0.03, "step_time_k2": 0.04}
    rec = GoodputController().recommend(ctx(steady(**metrics), 2, 0, 8, "goodput"))
    assert rec.value == 0
    assert "k=0 maximizes" in rec.reason


def test_goodput_alpha_model_from_acceptance_rate():
    """Without per-position counts: alpha is inverted from the acceptance rate measured at k=4 (which is
    lower than alpha itself), and the best k is the brute force over (1 - a^(k+1)) / (1 - a)."""
    alpha, k_now = 0.8, 4
    rate = acceptance_rate_of(alpha, k_now)
    assert rate < alpha - 0.1
    times = {k: 0.02 * (1 + 0.12 * k) for k in range(9)}
    metrics = {"acceptance_rate": rate, "acceptance_length": 1 + rate * k_now,
               **{f"step_time_k{k}": t for k, t in times.items()}}
    rec = GoodputController(hysteresis=0).recommend(
        ctx(steady(**metrics), k_now, 0, 8, "goodput", knobs=Knobs(spec_length=k_now)))
    assert rec.inputs["alpha"] == pytest.approx(alpha, abs=1e-4)
    want = max(range(9), key=lambda k: expected_tokens_alpha(alpha, k) / times[k])
    assert rec.value == want and want not in (0, 8)


def test_goodput_models_unmeasured_step_times_linearly():
    # Measured at k=0 and k=2 only: 20ms + 4ms per draft token; the line gives 36ms at k=4.
    survival = [0.9 ** j for j in range(1, 9)]
    metrics = {f"spec_accept_pos{j}": v for j, v in enumerate(survival, 1)}
    metrics |= {"step_time_k0": 0.020, "step_time_k2": 0.028}
    rec = GoodputController(hysteresis=0).recommend(ctx(steady(**metrics), 2, 0, 8, "goodput"))
    line = {k: 0.020 + 0.004 * k for k in range(9)}
    assert rec.value == brute_force_best(survival, line, range(9))
    assert "modelled" in rec.reason or rec.value in (0, 2)
    assert rec.inputs[f"step_time_k{int(rec.value)}"] == pytest.approx(line[int(rec.value)])


def test_goodput_explores_only_from_k0_without_any_acceptance():
    window = steady(**{"step_time_k0": 0.02})
    assert GoodputController().recommend(ctx(window, 0, 0, 8, "goodput")).value == 1
    assert GoodputController().recommend(ctx(window, 0, 0, 0, "goodput")).value is None
    assert GoodputController().recommend(ctx(window, 3, 0, 8, "goodput")).value is None


def test_goodput_keeps_a_k_within_hysteresis_of_the_best():
    survival = [0.9 ** j for j in range(1, 9)]
    metrics = {f"spec_accept_pos{j}": v for j, v in enumerate(survival, 1)}
    times = {k: 0.02 * (1 + 0.12 * k) for k in range(9)}
    metrics |= {f"step_time_k{k}": t for k, t in times.items()}
    best = brute_force_best(survival, times, range(9))
    rates = {k: (1 + sum(survival[:k])) / times[k] for k in range(9)}
    near = next(k for k in range(9) if k != best and rates[k] >= 0.99 * rates[best])
    rec = GoodputController(hysteresis=0.01).recommend(ctx(steady(**metrics), near, 0, 8, "goodput"))
    assert rec.value == near and "within 1%" in rec.reason


# --- aimd ---------------------------------------------------------------------------------------------------

SLO = Slo(itl_p95=0.060, ttft_p95=0.8)


def test_aimd_halves_on_breach_and_climbs_while_requests_wait():
    breach = steady(itl_p95=0.075, ttft_p95=0.3, requests_waiting=4.0, preemptions_per_s=0.0)
    rec = AimdController().recommend(ctx(breach, 32, 1, 128, "aimd", slo=SLO))
    assert rec.value == 16 and rec.urgent and "ITL p95 75ms > SLO 60ms" in rec.reason
    assert rec.inputs["itl_p95"] == pytest.approx(0.075)
    ttft = steady(itl_p95=0.05, ttft_p95=0.9, requests_waiting=4.0)
    assert AimdController().recommend(ctx(ttft, 32, 1, 128, "aimd", slo=SLO)).value == 16
    preempted = steady(itl_p95=0.02, preemptions_per_s=0.5, requests_waiting=4.0)
    assert AimdController().recommend(ctx(preempted, 32, 1, 128, "aimd", slo=SLO)).value == 16
    gentle = AimdController(decrease_factor=0.75)
    assert gentle.recommend(ctx(breach, 32, 1, 128, "aimd", slo=SLO)).value == 24

    ok = steady(itl_p95=0.04, ttft_p95=0.3, requests_waiting=4.0, preemptions_per_s=0.0)
    rec = AimdController().recommend(ctx(ok, 32, 1, 128, "aimd", slo=SLO, step_up=2))
    assert rec.value == 34 and not rec.urgent
    assert AimdController().recommend(ctx(ok, 32, 1, 128, "aimd", slo=SLO)).value == 33  # no max_step: +1
    idle = steady(itl_p95=0.04, requests_waiting=0.0)
    assert AimdController().recommend(ctx(idle, 32, 1, 128, "aimd", slo=SLO)).value == 32


def test_aimd_stays_inside_min_and_max():
    breach = steady(itl_p95=0.2, requests_waiting=4.0)
    assert AimdController().recommend(ctx(breach, 1, 1, 128, "aimd", slo=SLO)).value == 1
    assert AimdController().recommend(ctx(breach, 6, 4, 128, "aimd", slo=SLO)).value == 4
    ok = steady(itl_p95=0.01, requests_waiting=9.0)
    assert AimdController().recommend(ctx(ok, 128, 1, 128, "aimd", slo=SLO, step_up=8)).value == 128


def test_aimd_judges_only_samples_since_the_current_value_took_effect():
    # Breach in the first 20s (the old, larger batch), fine since the halving at t=20.
    samples = [{"ts": float(t), "itl_p95": 0.09 if t <= 20 else 0.03, "requests_waiting": 0.0}
               for t in range(30)]
    window = SampleSeries(samples)
    assert AimdController().recommend(ctx(window, 16, 1, 128, "aimd", slo=SLO)).value == 8
    assert AimdController().recommend(ctx(window, 16, 1, 128, "aimd", slo=SLO, since=20)).value == 16
    rec = AimdController().recommend(ctx(window, 16, 1, 128, "aimd", slo=SLO, since=29))
    assert rec.value is None and "no samples" in rec.reason


# --- builtin kv_compression and weight_bits ---------------------------------------------------------------


def test_kv_compression_builtin():
    c = KvCompressionController()
    pressed = steady(kv_usage=0.95, requests_waiting=3.0, preemptions_per_s=0.0)
    rec = c.recommend(ctx(pressed, 0.25, 0, 0.75, "builtin"))
    assert rec.value == pytest.approx(0.5) and "compress more" in rec.reason
    assert c.recommend(ctx(pressed, 0.75, 0, 0.75, "builtin")).value == pytest.approx(0.75)
    full_no_wait = steady(kv_usage=0.95, requests_waiting=0.0, preemptions_per_s=0.0)
    assert c.recommend(ctx(full_no_wait, 0.25, 0, 0.75, "builtin")).value == pytest.approx(0.25)
    # Pressure gone, but at 0.25 the usage would be 0.5 * 0.75 / 0.5 = 75% >= 70%: hold.
    relieved = steady(kv_usage=0.5, requests_waiting=0.0, preemptions_per_s=0.0)
    assert c.recommend(ctx(relieved, 0.5, 0, 0.75, "builtin")).value == pytest.approx(0.5)
    idle = steady(kv_usage=0.3, requests_waiting=0.0, preemptions_per_s=0.0)
    rec = c.recommend(ctx(idle, 0.5, 0, 0.75, "builtin"))
    assert rec.value == pytest.approx(0.25) and rec.inputs["kv_usage_projected"] == pytest.approx(0.45)
    # Quality at risk: compress less, even under pressure.
    risky = steady(kv_usage=0.95, requests_waiting=3.0, quality_top1=0.9, quality_kl=0.01)
    rec = c.recommend(ctx(risky, 0.5, 0, 0.75, "builtin"))
    assert rec.value == pytest.approx(0.25) and "quality_top1" in rec.reason


def test_weight_bits_builtin():
    c = WeightBitsController()
    slo = Slo(itl_p95=0.025)
    memory_bound = steady(itl_p95=0.03, requests_running=4.0)
    rec = c.recommend(ctx(memory_bound, 16, 4, 16, "builtin", slo=slo, knobs=Knobs(spec_length=3)))
    assert rec.value == 8 and "memory-bound" in rec.reason
    assert c.recommend(ctx(memory_bound, 8, 8, 16, "builtin", slo=slo)).value == 8      # min 8
    compute_bound = steady(itl_p95=0.03, requests_running=64.0)
    assert c.recommend(ctx(compute_bound, 16, 4, 16, "builtin", slo=slo)).value == 16
    # 8 bits, ITL 15ms: at 16 bits about 30ms > 80% of 25ms: stay; at 9ms it would be 18ms: go up.
    fast, faster = steady(itl_p95=0.015, requests_running=4.0), steady(itl_p95=0.009, requests_running=4.0)
    assert c.recommend(ctx(fast, 8, 4, 16, "builtin", slo=slo)).value == 8
    assert c.recommend(ctx(faster, 8, 4, 16, "builtin", slo=slo)).value == 16
    risky = steady(itl_p95=0.03, requests_running=4.0, quality_top1=0.99, quality_kl=0.2)
    rec = c.recommend(ctx(risky, 4, 4, 16, "builtin", slo=slo))
    assert rec.value == 8 and "quality_kl" in rec.reason


# --- closed loop ------------------------------------------------------------------------------------------


Plant = Callable[[Knobs, random.Random, float], dict]


def closed_loop(knobs_yaml: str, plant: Plant, start: Knobs, seconds: int, *, seed: int = 0,
                up: str = "30s", down: str = "120s", up_step: str = "null", down_step: str = "null",
                slo: str = "{itl_p95: 60ms, ttft_p95: 800ms}") -> tuple[list[Knobs], list[Decision]]:
    """Runs a policy against `plant` (metrics as a function of the knobs) with one sample a second and an
    evaluation every 5s; applied decisions take effect at once. Returns the knobs each second and the
    decisions."""
    text = f"""
apiVersion: optd/v1
kind: Policy
metadata: {{name: loop}}
spec:
  evaluate_every: 5s
  slo: {slo}
  knobs:
{knobs_yaml}
  behavior:
    up: {{stabilization_window: {up}, max_step: {up_step}}}
    down: {{stabilization_window: {down}, max_step: {down_step}}}
"""
    evaluator = PolicyEvaluator(parse_policy(text), {"max_batch_size": (1, 256), "spec_length": (0, 8)})
    rng, series, knobs = random.Random(seed), SampleSeries(), start
    trace, decisions = [], []
    for t in range(seconds):
        series.append({"ts": float(t), **plant(knobs, rng, t), **dataclasses.asdict(knobs)})
        if t % 5 == 0:
            for d in evaluator.evaluate(series, knobs, float(t)):
                decisions.append(d)
                if d.outcome == "applied":
                    kind = type(getattr(knobs, d.knob))
                    knobs = dataclasses.replace(knobs, **{d.knob: kind(d.new)})
                evaluator.record_outcome(d)
        trace.append(knobs)
    return trace, decisions


def reversals(values: list[float]) -> int:
    moves = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


# A drafter that gets three tokens right and then mostly guesses (conditional acceptance 0.95, 0.9, 0.9,
# then 0.4), drafts costing 20% of a target step each: k=3 is best by 3.5% over k=4.
SURVIVAL = list(itertools.accumulate([0.95, 0.9, 0.9, 0.4, 0.4, 0.4, 0.4, 0.4], operator.mul))
STEP = {k: 0.02 * (1 + 0.2 * k) for k in range(9)}


def speculation_plant(noise: float) -> Plant:
    measured: dict[int, float] = {}   # like the engine: step times of every k ever run, smoothed

    def plant(knobs: Knobs, rng: random.Random, t: float) -> dict:
        k = knobs.spec_length
        measured[k] = STEP[k] * (1 + rng.uniform(-noise, noise))
        out = {f"step_time_k{j}": v for j, v in measured.items()}
        for j in range(1, k + 1):
            out[f"spec_accept_pos{j}"] = min(1.0, SURVIVAL[j - 1] * (1 + rng.uniform(-noise, noise)))
        return out
    return plant


def test_goodput_converges_on_a_steady_series_and_holds_there():
    best = brute_force_best(SURVIVAL, STEP, range(9))
    assert 2 <= best <= 6
    trace, decisions = closed_loop("    spec_length: {min: 0, max: 8, controller: goodput}",
                                   speculation_plant(0.0), Knobs(spec_length=0), 900, up_step="2")
    assert trace[-1].spec_length == best
    assert all(0 <= d.new <= 8 for d in decisions)
    assert not [d for d in decisions if d.ts > 450], "it keeps moving after converging"


@pytest.mark.parametrize("seed", range(3))
def test_goodput_does_not_flap_on_a_noisy_series(seed):
    seconds = 3600
    damped, _ = closed_loop("    spec_length: {min: 1, max: 8, controller: goodput}",
                            speculation_plant(0.15), Knobs(spec_length=1), seconds, seed=seed)
    ks = [k.spec_length for k in damped]
    assert all(1 <= k <= 8 for k in ks)
    # A down move needs 120s of agreement after the last up recommendation, an up move 30s.
    assert reversals(ks) <= 2 * seconds / 150 + 1
    best = brute_force_best(SURVIVAL, STEP, range(1, 9))
    assert sum(abs(k - best) <= 1 for k in ks[600:]) >= 0.9 * len(ks[600:])


def latency_plant(noise: float, demand: int = 1000) -> Plant:
    """ITL grows with the batch: 20ms + 1ms per sequence, so the 60ms SLO holds up to 40."""
    def plant(knobs: Knobs, rng: random.Random, t: float) -> dict:
        b = knobs.max_batch_size
        return {"itl_p95": (0.020 + 0.001 * b) * (1 + rng.uniform(-noise, noise)), "ttft_p95": 0.3,
                "requests_waiting": float(max(0, demand - b)), "requests_running": float(min(b, demand)),
                "preemptions_per_s": 0.0}
    return plant


def test_aimd_converges_on_steady_series():
    knob = "    max_batch_size: {min: 2, max: 48, controller: aimd}"
    # Always breaching (the SLO is lower than any batch can give): down to min, and stays.
    trace, decisions = closed_loop(knob, latency_plant(0.0), Knobs(max_batch_size=32), 300,
                                   slo="{itl_p95: 10ms}")
    assert trace[-1].max_batch_size == 2 and [d.new for d in decisions] == [16, 8, 4, 2]
    # Never breaching, always waiting: up to max, and stays.
    trace, decisions = closed_loop(knob, latency_plant(0.0), Knobs(max_batch_size=2), 1200,
                                   slo="{itl_p95: 1s}", up_step="4")
    assert trace[-1].max_batch_size == 48 and all(d.new <= 48 for d in decisions)
    assert not [d for d in decisions if d.ts > 900]


@pytest.mark.parametrize("seed", range(3))
def test_aimd_saws_below_the_slo_limit_without_flapping(seed):
    seconds = 3600
    trace, decisions = closed_loop("    max_batch_size: {min: 1, max: 128, controller: aimd}",
                                   latency_plant(0.1), Knobs(max_batch_size=8), seconds, seed=seed,
                                   up_step="2")
    sizes = [k.max_batch_size for k in trace]
    first_cut = next(i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1])
    # The SLO holds up to ~40 (+-10% noise): it climbs to the limit, halves, climbs again.
    assert all(14 <= b <= 48 for b in sizes[first_cut:])
    assert all(d.new < d.old for d in decisions if "> SLO" in d.reason)
    assert all(d.new > d.old for d in decisions if "requests wait" in d.reason)
    # Each climb after a cut needs the up window (30s) of agreement: no back-and-forth every tick.
    assert reversals(sizes) <= seconds / 30 + 1
    undamped, _ = closed_loop("    max_batch_size: {min: 1, max: 128, controller: aimd}",
                              latency_plant(0.1), Knobs(max_batch_size=8), seconds, seed=seed, up="0s",
                              down="0s", up_step="2")
    assert reversals(sizes) < reversals([k.max_batch_size for k in undamped])


def kv_plant(demand: float) -> Plant:
    """KV demand in units of the uncompressed cache: usage = demand x (1 - ratio), capped at 1; requests
    wait while usage would exceed 95%."""
    def plant(knobs: Knobs, rng: random.Random, t: float) -> dict:
        d = demand * (1 + rng.uniform(-0.05, 0.05)) if demand > 0 else 0.0
        need = d * (1 - knobs.kv_compression)
        return {"kv_usage": min(need, 1.0), "requests_waiting": 3.0 if need > 0.95 else 0.0,
                "preemptions_per_s": 0.0}
    return plant


def test_kv_compression_builtin_converges_and_relaxes():
    knob = "    kv_compression: {min: 0.0, max: 0.75, controller: builtin}"
    trace, decisions = closed_loop(knob, kv_plant(1.4), Knobs(kv_compression=0.0), 900)
    # 1.4 x 0.75 = 1.05 still overflows; 1.4 x 0.5 = 0.7 fits, and 0.7 x 0.75 / 0.5 > 0.7: it stays.
    assert trace[-1].kv_compression == pytest.approx(0.5)
    assert all(0 <= d.new <= 0.75 for d in decisions)
    assert reversals([k.kv_compression for k in trace]) == 0
    trace, _ = closed_loop(knob, kv_plant(0.3), Knobs(kv_compression=0.75), 1200)
    assert trace[-1].kv_compression == 0.0


def bits_plant(knobs: Knobs, rng: random.Random, t: float) -> dict:
    # Memory-bound decode: ITL follows the weight bytes.
    return {"itl_p95": 0.030 * knobs.weight_bits / 16 * (1 + rng.uniform(-0.1, 0.1)), "requests_running": 4.0}


def test_weight_bits_builtin_converges_to_the_level_that_meets_the_slo():
    knob = "    weight_bits: {min: 4, max: 16, controller: builtin}"
    trace, decisions = closed_loop(knob, bits_plant, Knobs(weight_bits=16), 1200, slo="{itl_p95: 25ms}")
    assert trace[-1].weight_bits == 8
    assert [(d.old, d.new) for d in decisions] == [(16, 8)]
    trace, decisions = closed_loop(knob, bits_plant, Knobs(weight_bits=4), 1200, slo="{itl_p95: 25ms}")
    assert trace[-1].weight_bits == 8 and [(d.old, d.new) for d in decisions] == [(4, 8)]


@pytest.mark.parametrize("seed", range(4))
def test_no_controller_leaves_min_max_on_wild_series(seed):
    """Random metrics, random bounds inside the natural ranges: every decision stays inside."""
    rng = random.Random(seed)
    bounds = {"spec_length": sorted(rng.sample(range(0, 9), 2)),
              "max_batch_size": sorted(rng.sample(range(1, 65), 2)),
              "kv_compression": sorted(round(rng.uniform(0, 0.95), 2) for _ in range(2)),
              "weight_bits": sorted(rng.sample([4, 8, 16], 2))}
    controllers = {"spec_length": "goodput", "max_batch_size": "aimd", "kv_compression": "builtin",
                   "weight_bits": "builtin"}
    knobs_yaml = "\n".join(f"    {k}: {{min: {lo}, max: {hi}, controller: {controllers[k]}}}"
                           for k, (lo, hi) in bounds.items())

    def wild(knobs: Knobs, rng: random.Random, t: float) -> dict:
        out = {m: rng.choice([None, rng.uniform(0, 1)]) for m in (
            "itl_p95", "ttft_p95", "kv_usage", "acceptance_rate", "quality_top1", "quality_kl")}
        out |= {"requests_waiting": rng.choice([0.0, 5.0]), "requests_running": rng.uniform(0, 100),
                "preemptions_per_s": rng.choice([0.0, 0.0, 1.0]), "acceptance_length": rng.uniform(1, 5),
                f"step_time_k{rng.randrange(9)}": rng.uniform(0.001, 0.1),
                "spec_accept_pos1": rng.uniform(0, 1)}
        return out
    start = Knobs(spec_length=bounds["spec_length"][0], max_batch_size=bounds["max_batch_size"][0],
                  kv_compression=bounds["kv_compression"][0], weight_bits=bounds["weight_bits"][0])
    trace, decisions = closed_loop(knobs_yaml, wild, start, 1800, seed=seed, up="5s", down="10s")
    assert decisions, "a wild series should move something"
    for d in decisions:
        lo, hi = bounds[d.knob]
        assert lo <= d.new <= hi, d
    for k in trace:
        assert k.weight_bits in (4, 8, 16) and float(k.spec_length).is_integer()
