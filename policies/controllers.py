"""Controllers: per knob, from a window of samples to a recommended value, the inputs used and a reason.

A controller is pure: `recommend(ctx)` reads only `ctx` (the window, the time, the knob's current value,
since when it has been in force, its bounds, the SLO and the other knobs) and returns a Recommendation.
A recommendation with `value` None means "no data to judge": the evaluator then does nothing for the
knob. Damping (stabilization windows, max_step, tolerance, rounding) is applied afterwards by
optd.policies.damping; controllers say where the knob should go, not how fast.

Measurements that depend on a knob's value (latency, queue, KV usage) are read only from samples taken
since the current value has been in force (`ctx.since`, tracked by the evaluator), so a controller never
reacts twice to what an earlier value caused.

Sample keys read beyond DESIGN.md's flat sample (optional: without them the controllers fall back):
- `spec_accept_pos<j>` (j = 1..max_spec_length): the fraction of drafts in the interval whose first j
  draft tokens were all accepted = delta(spec_accepted_per_pos[j-1]) / delta(spec_drafts_total); None
  when there were no drafts or j > the spec_length in force.
- `step_time_k<k>` (k = 0..max_spec_length): the engine's smoothed decode step time in seconds at
  spec_length k (EngineStats.step_time_s[k]); absent or None for a k never measured.
"""

import math
from dataclasses import dataclass, field
from typing import Protocol

from optd.engine.knobs import Knobs
from optd.policies.damping import WEIGHT_BITS_LEVELS
from optd.policies.metrics import SampleWindow
from optd.policies.schema import KnobPolicy, Slo

LOOKBACK_S = 30.0        # measurements a decision is based on (further limited to ctx.since)
HISTORY_S = 600.0        # how far back slow-changing facts (quality, step times, acceptance) are looked up
QUALITY_TOP1_MIN = 0.97  # the builtin controllers' idea of "quality at risk" (DESIGN.md's example guardrail)
QUALITY_KL_MAX = 0.05


@dataclass(frozen=True)
class ControllerInput:
    window: SampleWindow
    now: float
    current: float
    bounds: KnobPolicy
    slo: Slo
    since: float = -math.inf          # the current value has been in force since then
    knobs: Knobs = field(default_factory=Knobs)
    step_up: float | None = None      # behavior.up.max_step: aimd's additive increase


@dataclass(frozen=True)
class Recommendation:
    value: float | None               # None: no data to judge, do nothing
    reason: str
    inputs: dict[str, float | None] = field(default_factory=dict)
    urgent: bool = False              # a safety move: skips its direction's stabilization window


class Controller(Protocol):
    name: str

    def recommend(self, ctx: ControllerInput) -> Recommendation: ...


# --- window helpers ------------------------------------------------------------------------------------


def since_current(ctx: ControllerInput, metric: str, lookback: float) -> list[float]:
    """Values of `metric` from the last `lookback` seconds, taken while the current value was in force."""
    span = min(lookback, ctx.now - ctx.since)
    return [float(v) for v in ctx.window.window(metric, span, ctx.now)] if span > 0 else []


def recent(ctx: ControllerInput, metric: str, seconds: float) -> list[float]:
    return [float(v) for v in ctx.window.window(metric, seconds, ctx.now)]


def newest(ctx: ControllerInput, metric: str, seconds: float = HISTORY_S) -> float | None:
    # Most metrics looked up this way are in (nearly) every sample: a short window first keeps a replay
    # over a day of samples cheap.
    for span in (min(10.0, seconds), seconds):
        values = ctx.window.window(metric, span, ctx.now)
        if values:
            return float(values[-1])
    return None


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def median(values: list[float]) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.4g}ms"


def fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"


def quality_at_risk(ctx: ControllerInput) -> tuple[str | None, dict[str, float | None]]:
    """Why the latest quality probe says quality is at risk (None when it does not, or there is none)."""
    top1, kl = newest(ctx, "quality_top1"), newest(ctx, "quality_kl")
    inputs = {"quality_top1": top1, "quality_kl": kl}
    if top1 is not None and top1 < QUALITY_TOP1_MIN:
        return f"quality_top1 {top1:.3f} < {QUALITY_TOP1_MIN}", inputs
    if kl is not None and kl > QUALITY_KL_MAX:
        return f"quality_kl {kl:.3f} > {QUALITY_KL_MAX}", inputs
    return None, inputs


# --- goodput (spec_length) -------------------------------------------------------------------------------


def expected_tokens_alpha(alpha: float, k: int) -> float:
    """Tokens per target step with k drafts, each accepted with probability alpha given the previous
    ones were: 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def acceptance_rate_of(alpha: float, k: float) -> float:
    """The acceptance rate (accepted / proposed) that per-token acceptance alpha gives with k drafts."""
    if k <= 0:
        return alpha
    if alpha >= 1.0:
        return 1.0
    return alpha * (1.0 - alpha ** k) / (k * (1.0 - alpha))


def alpha_from_rate(rate: float, k: float) -> float:
    """Invert acceptance_rate_of (increasing in alpha) by bisection: the sampled acceptance rate is
    accepted/proposed, which understates the per-token alpha of the geometric model when k > 1."""
    rate = min(max(rate, 0.0), 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if acceptance_rate_of(mid, k) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def expected_tokens_survival(survival: list[float], k: int) -> float:
    """Tokens per target step with k drafts from measured survival a_j = P(first j drafts accepted):
    1 + a_1 + ... + a_k. Beyond the measured positions the last measured conditional acceptance
    a_m / a_(m-1) is assumed to continue geometrically."""
    total, a = 1.0, 1.0
    prev, last = 1.0, 1.0
    ratio = 0.0
    if survival:
        last = survival[-1]
        prev = survival[-2] if len(survival) > 1 else 1.0
        ratio = last / prev if prev > 0 else 0.0
    for j in range(1, k + 1):
        a = survival[j - 1] if j <= len(survival) else a * ratio
        total += a
    return total


def model_step_times(measured: dict[int, float], ks: list[int], draft_cost: float) -> dict[int, float]:
    """Step time per k: measured where measured; elsewhere a least-squares line through the measured
    points (slope floored at 0); with one point, that point scaled by (1 + draft_cost k); with none,
    1 + draft_cost k in relative units (only ratios between k matter)."""
    out: dict[int, float] = {}
    pts = sorted(measured.items())
    if len(pts) >= 2:
        n = len(pts)
        mk = sum(k for k, _ in pts) / n
        mt = sum(t for _, t in pts) / n
        var = sum((k - mk) ** 2 for k, _ in pts)
        slope = max(0.0, sum((k - mk) * (t - mt) for k, t in pts) / var) if var > 0 else 0.0
        intercept = mt - slope * mk if slope > 0 else mt
        model = lambda k: max(intercept + slope * k, 1e-9)  # noqa: E731
    elif pts:
        k0, t0 = pts[0]
        model = lambda k: t0 * (1 + draft_cost * k) / (1 + draft_cost * k0)  # noqa: E731
    else:
        model = lambda k: 1.0 + draft_cost * k  # noqa: E731
    for k in ks:
        out[k] = measured.get(k, model(k))
    return out


class GoodputController:
    """spec_length: the k in [min, max] (k = 0 included) that maximizes expected tokens per second =
    expected tokens per step(k) / step time(k).

    Expected tokens per step: from the measured per-position survival (`spec_accept_pos<j>`, averaged
    over `lookback`; positions above the k in force keep the value learned when they were last
    measured, for `memory` seconds, after which a k below them may explore them again) when the
    samples carry it, else the geometric model with alpha inverted from `acceptance_rate` (and the mean
    drafts per step, (acceptance_length - 1) / acceptance_rate). Acceptance is looked up over
    `lookback`, falling back to the newest value within HISTORY_S (it does not depend on k, and while
    k = 0 nothing is measured). With no acceptance measured at all and k = 0, it recommends k = 1
    (when allowed) to measure it, at most once per HISTORY_S of k = 0.
    Step times: `step_time_k<k>` where measured, model_step_times elsewhere. The current k is kept
    when it is within `hysteresis` (relative) of the best, and ties go to the smaller k.

    How it explores: positions above the measured ones continue the last measured conditional
    acceptance (expected_tokens_survival), and unmeasured step times follow the line through the
    measured ones; when that model says a larger k pays, k moves there (as fast as damping allows),
    measures it, and comes back if the model was optimistic. What it learned is kept for `memory`.
    """

    name = "goodput"

    def __init__(self, lookback: float = 60.0, draft_cost: float = 0.1, hysteresis: float = 0.01,
                 memory: float = 1800.0) -> None:
        self.lookback, self.draft_cost = lookback, draft_cost
        self.hysteresis, self.memory = hysteresis, memory
        # Per-position survival learned while k was large enough to measure it: position -> (ts, value).
        # Only positions up to the k in force are measured, so without this memory a k below the best
        # would forget what the positions above it are worth and explore again every lookback.
        self._known: dict[int, tuple[float, float]] = {}

    def recommend(self, ctx: ControllerInput) -> Recommendation:
        lo, hi = math.ceil(ctx.bounds.min), math.floor(ctx.bounds.max)
        ks = list(range(lo, hi + 1))
        current = round(ctx.current)
        if not ks:
            return Recommendation(None, f"no whole spec_length in [{ctx.bounds.min}, {ctx.bounds.max}]")
        survival = self._survival(ctx, hi)
        alpha, alpha_inputs = self._alpha(ctx)
        inputs: dict[str, float | None] = dict(alpha_inputs)
        if not survival and alpha is None:
            if current == 0 and lo <= 1 <= hi:
                return Recommendation(1.0, "no acceptance measured yet: trying spec_length 1 to measure it",
                                      inputs)
            return Recommendation(None, "no acceptance measured yet", inputs)
        if survival:
            expected = {k: expected_tokens_survival(survival, k) for k in ks}
            basis = f"per-position acceptance over {len(survival)} positions"
            inputs.update({f"spec_accept_pos{j}": a for j, a in enumerate(survival, 1)})
        else:
            expected = {k: expected_tokens_alpha(alpha, k) for k in ks}
            basis = f"acceptance alpha {alpha:.3f}"
        measured = {}
        for k in ks:
            t = newest(ctx, f"step_time_k{k}")
            if t is not None and t > 0:
                measured[k] = t
        times = model_step_times(measured, ks, self.draft_cost)
        rate = {k: expected[k] / times[k] for k in ks}
        best = max(ks, key=lambda k: (rate[k], -k))
        kept = ""
        if current in rate and current != best and rate[current] >= rate[best] * (1 - self.hysteresis):
            kept, best = f" (best is k={best}, within {self.hysteresis:.0%})", current
        for k in sorted({best, current} & set(ks)):
            inputs[f"expected_tokens_k{k}"] = round(expected[k], 6)
            inputs[f"step_time_k{k}"] = times[k]
            inputs[f"tokens_per_s_k{k}"] = round(rate[k], 6)
        what = "measured" if best in measured else "modelled"
        shown = ms(times[best]) if measured else f"{times[best]:.3g} (relative)"
        reason = (f"k={best} maximizes expected tokens/s: {expected[best]:.2f} tokens per step / "
                  f"{shown} {what} step time ({basis}){kept}")
        if current in rate and best != current:
            reason += f"; k={current} gives {rate[current] / rate[best]:.0%} of that"
        return Recommendation(float(best), reason, inputs)

    def _survival(self, ctx: ControllerInput, hi: int) -> list[float]:
        for j in range(1, hi + 1):
            values = recent(ctx, f"spec_accept_pos{j}", self.lookback)
            if values:
                self._known[j] = (ctx.now, sum(values) / len(values))
        out: list[float] = []
        for j in range(1, hi + 1):
            known = self._known.get(j)
            if known is None or not ctx.now - self.memory <= known[0] <= ctx.now:
                break
            # Survival cannot grow with j; noisy intervals could make it look so.
            out.append(min(max(known[1], 0.0), out[-1] if out else 1.0))
        return out

    def _alpha(self, ctx: ControllerInput) -> tuple[float | None, dict[str, float | None]]:
        rates = recent(ctx, "acceptance_rate", self.lookback)
        lengths = recent(ctx, "acceptance_length", self.lookback)
        if not rates:
            last_rate = newest(ctx, "acceptance_rate")
            rates = [last_rate] if last_rate is not None else []
            last_len = newest(ctx, "acceptance_length")
            lengths = [last_len] if last_len is not None else []
        rate, length = mean(rates), mean(lengths)
        inputs: dict[str, float | None] = {"acceptance_rate": rate, "acceptance_length": length}
        if rate is None:
            return None, inputs
        # Drafts proposed per speculating step: accepted/drafts = rate * k, and length = 1 + that.
        k = (length - 1) / rate if length is not None and rate > 0 else max(ctx.knobs.spec_length, 1)
        alpha = alpha_from_rate(rate, max(k, 1e-6))
        inputs["alpha"] = round(alpha, 6)
        return alpha, inputs


# --- aimd (max_batch_size) -------------------------------------------------------------------------------


class AimdController:
    """max_batch_size: additive increase by `step_up` (behavior.up.max_step, else 1) while the SLOs hold
    and requests wait (waiting in at least half of the samples); multiplicative decrease (x
    `decrease_factor`) on an SLO breach or preemptions; otherwise hold.

    A breach: the mean of the per-sample ITL (TTFT) p95 over the samples taken since the current batch
    size took effect (at most `lookback`) is above the policy's slo.itl_p95 (ttft_p95). The mean of
    per-second p95s estimates the window's p95 under steady load, and one slow second does not halve
    the batch by itself. An SLO with no data in the span (nothing finished) does not block an increase.
    The decrease is urgent (damping does not wait for the down stabilization window)."""

    name = "aimd"

    def __init__(self, lookback: float = LOOKBACK_S, decrease_factor: float = 0.5) -> None:
        if not 0 < decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {decrease_factor!r}")
        self.lookback, self.decrease_factor = lookback, decrease_factor

    def recommend(self, ctx: ControllerInput) -> Recommendation:
        itl = mean(since_current(ctx, "itl_p95", self.lookback))
        ttft = mean(since_current(ctx, "ttft_p95", self.lookback))
        preempt = mean(since_current(ctx, "preemptions_per_s", self.lookback))
        waiting = median(since_current(ctx, "requests_waiting", self.lookback))
        inputs = {"itl_p95": itl, "ttft_p95": ttft, "preemptions_per_s": preempt, "requests_waiting": waiting,
                  "slo.itl_p95": ctx.slo.itl_p95, "slo.ttft_p95": ctx.slo.ttft_p95}
        if all(v is None for v in (itl, ttft, preempt, waiting)):
            return Recommendation(None, "no samples since the current batch size took effect", inputs)
        current = ctx.current
        breaches = []
        if ctx.slo.itl_p95 is not None and itl is not None and itl > ctx.slo.itl_p95:
            breaches.append(f"ITL p95 {ms(itl)} > SLO {ms(ctx.slo.itl_p95)}")
        if ctx.slo.ttft_p95 is not None and ttft is not None and ttft > ctx.slo.ttft_p95:
            breaches.append(f"TTFT p95 {ms(ttft)} > SLO {ms(ctx.slo.ttft_p95)}")
        if preempt is not None and preempt > 0:
            breaches.append(f"{preempt:.2g} preemptions/s")
        if breaches:
            target = max(ctx.bounds.min, min(current - 1, math.floor(current * self.decrease_factor)))
            return Recommendation(float(target), f"{' and '.join(breaches)}: multiply the batch size by "
                                  f"{self.decrease_factor:g} ({fmt(current)} -> {fmt(target)})",
                                  inputs, urgent=True)
        if waiting is not None and waiting > 0:
            step = self.step(ctx)
            target = min(ctx.bounds.max, current + step)
            return Recommendation(float(target), f"SLOs hold and {fmt(waiting)} requests wait: add "
                                  f"{fmt(step)} ({fmt(current)} -> {fmt(target)})", inputs)
        return Recommendation(current, "SLOs hold and no requests wait: hold", inputs)

    @staticmethod
    def step(ctx: ControllerInput) -> float:
        return max(1.0, math.floor(ctx.step_up)) if ctx.step_up is not None else 1.0


# --- builtin kv_compression --------------------------------------------------------------------------------


class KvCompressionController:
    """kv_compression, in steps of `step` (0.25: 16-bit -> 0.25 -> 0.5 = 8-bit pages -> 0.75 = 4-bit):
    - less when the latest quality probe says quality is at risk (top1 < 0.97 or kl > 0.05);
    - more when the mean kv_usage since the current value took effect is >= `high` and requests wait
      (median > 0) or are preempted, and quality is not at risk;
    - less when no requests wait, none are preempted, and the usage projected at the lower ratio,
      usage x (1 - lower) / (1 - current), stays below `low` (so compressing less does not recreate
      the pressure that compressing more relieved: no flapping between two values);
    - otherwise hold."""

    name = "builtin"

    def __init__(self, lookback: float = LOOKBACK_S, step: float = 0.25, high: float = 0.9,
                 low: float = 0.7) -> None:
        self.lookback, self.step, self.high, self.low = lookback, step, high, low

    def recommend(self, ctx: ControllerInput) -> Recommendation:
        usage = mean(since_current(ctx, "kv_usage", self.lookback))
        waiting = median(since_current(ctx, "requests_waiting", self.lookback))
        preempt = mean(since_current(ctx, "preemptions_per_s", self.lookback))
        risk, q_inputs = quality_at_risk(ctx)
        inputs = {"kv_usage": usage, "requests_waiting": waiting, "preemptions_per_s": preempt, **q_inputs}
        current = ctx.current
        if risk is not None:
            return Recommendation(max(ctx.bounds.min, current - self.step),
                                  f"{risk}: compress the KV cache less", inputs)
        if usage is None:
            return Recommendation(None, "no kv_usage since the current ratio took effect", inputs)
        pressed = (waiting or 0) > 0 or (preempt or 0) > 0
        if usage >= self.high and pressed:
            why = "requests wait" if (waiting or 0) > 0 else "requests are preempted"
            return Recommendation(min(ctx.bounds.max, current + self.step),
                                  f"KV usage {usage:.0%} >= {self.high:.0%} and {why}: compress more", inputs)
        lower = max(ctx.bounds.min, current - self.step)
        if lower < current and not pressed:
            projected = usage * (1 - lower) / (1 - current)
            inputs["kv_usage_projected"] = round(projected, 6)
            if projected < self.low:
                return Recommendation(lower, f"KV pressure gone: usage {usage:.0%} would be {projected:.0%} "
                                      f"at ratio {fmt(lower)} (< {self.low:.0%}): compress less", inputs)
        return Recommendation(current, f"KV usage {usage:.0%}: hold", inputs)


# --- builtin weight_bits ------------------------------------------------------------------------------------


class WeightBitsController:
    """weight_bits, one level of 4/8/16 at a time:
    - more bits when the latest quality probe says quality is at risk;
    - fewer bits when the ITL SLO is breached (mean per-sample ITL p95 since the current value took
      effect) and decode is memory-bound: fewer than `memory_bound_tokens` tokens per step (mean
      requests_running x (spec_length + 1)), where a decode step reads every weight once for few
      tokens and its time follows the weight bytes (GPU ridge points are a few hundred FLOP/byte);
    - more bits when the ITL p95 projected at the higher level as if fully memory-bound,
      itl x higher / current, stays within `headroom` of the SLO (so the next breach is not immediate);
    - otherwise hold. Without an ITL SLO nothing asks for fewer bits."""

    name = "builtin"

    def __init__(self, lookback: float = LOOKBACK_S, memory_bound_tokens: float = 64.0,
                 headroom: float = 0.8) -> None:
        self.lookback, self.memory_bound_tokens, self.headroom = lookback, memory_bound_tokens, headroom

    def recommend(self, ctx: ControllerInput) -> Recommendation:
        itl = mean(since_current(ctx, "itl_p95", self.lookback))
        running = mean(since_current(ctx, "requests_running", self.lookback))
        risk, q_inputs = quality_at_risk(ctx)
        inputs = {"itl_p95": itl, "requests_running": running, "slo.itl_p95": ctx.slo.itl_p95,
                  "spec_length": float(ctx.knobs.spec_length), **q_inputs}
        current = ctx.current
        levels = [lv for lv in WEIGHT_BITS_LEVELS if ctx.bounds.min <= lv <= ctx.bounds.max]
        higher = next((lv for lv in levels if lv > current), None)
        lower = next((lv for lv in reversed(levels) if lv < current), None)
        if risk is not None:
            if higher is None:
                return Recommendation(current, f"{risk}, but {fmt(current)} bits is the policy's max", inputs)
            return Recommendation(higher, f"{risk}: more bits ({fmt(current)} -> {fmt(higher)})", inputs)
        slo = ctx.slo.itl_p95
        if slo is None or itl is None:
            return Recommendation(None, "no ITL SLO or no ITL samples since the current value took effect",
                                  inputs)
        if itl > slo:
            if running is None:
                return Recommendation(None, "ITL SLO breached but no requests_running samples", inputs)
            tokens = running * (ctx.knobs.spec_length + 1)
            inputs["tokens_per_step"] = tokens
            if tokens >= self.memory_bound_tokens:
                return Recommendation(current, f"ITL p95 {ms(itl)} > SLO {ms(slo)} but decode is not "
                                      f"memory-bound ({tokens:.0f} tokens per step): hold", inputs)
            if lower is None:
                return Recommendation(current, f"ITL p95 {ms(itl)} > SLO {ms(slo)}, but {fmt(current)} bits "
                                      "is the policy's min", inputs)
            return Recommendation(lower, f"ITL p95 {ms(itl)} > SLO {ms(slo)} and decode is memory-bound "
                                  f"({tokens:.0f} tokens per step < {self.memory_bound_tokens:.0f}): fewer "
                                  f"bits ({fmt(current)} -> {fmt(lower)})", inputs)
        if higher is not None:
            projected = itl * higher / current
            inputs["itl_p95_projected"] = round(projected, 9)
            if projected <= self.headroom * slo:
                return Recommendation(higher, f"ITL p95 {ms(itl)} would be about {ms(projected)} at "
                                      f"{fmt(higher)} bits, within {self.headroom:.0%} of the SLO {ms(slo)}: "
                                      "more bits", inputs)
        return Recommendation(current, f"ITL p95 {ms(itl)} within SLO {ms(slo)}: hold", inputs)


def controller_for(knob: str, kind: str) -> Controller | None:
    """The controller object for a knob's `controller:` setting (None for rules and none)."""
    if kind == "goodput":
        return GoodputController()
    if kind == "aimd":
        return AimdController()
    if kind == "builtin":
        return KvCompressionController() if knob == "kv_compression" else WeightBitsController()
    return None
