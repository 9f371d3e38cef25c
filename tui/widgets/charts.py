"""Live charts over the chosen window: one row per chart, a sparkline (Textual's Sparkline) with the
numbers beside it, and the limit it is held against (SLO, guardrail) where there is one. A value past
its limit turns red. Rows are one line high on a small terminal and taller when there is room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from optd.tui import fmt
from optd.tui.state import DashboardState

Fmt = Callable[[float | None], str]


@dataclass(frozen=True)
class Extra:
    metric: str
    label: str
    fmt: Fmt


@dataclass(frozen=True)
class ChartSpec:
    key: str
    title: str
    metric: str                       # what the sparkline draws
    fmt: Fmt
    extras: tuple[Extra, ...] = ()    # numbers beside it
    # (label, value, is it an upper limit) of the limit the metric is held against, if any
    limit: Callable[[DashboardState], tuple[str, float, bool] | None] = lambda s: None


def _slo(metric: str) -> Callable[[DashboardState], tuple[str, float, bool] | None]:
    def limit(state: DashboardState) -> tuple[str, float, bool] | None:
        value = state.policy.slo.get(metric) if state.policy else None
        return None if value is None else ("SLO", value, True)
    return limit


def _guard(key: str, upper: bool) -> Callable[[DashboardState], tuple[str, float, bool] | None]:
    def limit(state: DashboardState) -> tuple[str, float, bool] | None:
        value = state.policy.guardrails.get(key) if state.policy else None
        return None if value is None else ("guard", value, upper)
    return limit


def _n(digits: int) -> Fmt:
    return lambda v: fmt.number(v, digits)


CHARTS: tuple[ChartSpec, ...] = (
    ChartSpec("tokens", "tokens/s", "tokens_per_s", _n(1),
              (Extra("goodput_tokens_per_s", "good", _n(1)),)),
    ChartSpec("ttft", "TTFT p95", "ttft_p95", fmt.seconds, limit=_slo("ttft_p95")),
    ChartSpec("itl", "ITL p95", "itl_p95", fmt.seconds, limit=_slo("itl_p95")),
    ChartSpec("accept", "accept", "acceptance_rate", fmt.ratio,
              (Extra("acceptance_length", "len", _n(2)),)),
    ChartSpec("kv", "KV use", "kv_usage", fmt.ratio,
              (Extra("kv_compression_achieved", "comp", _n(2)), Extra("kv_compression", "target", _n(2)))),
    ChartSpec("gpu", "GPU mem", "gpu_memory_used_ratio", fmt.ratio,
              (Extra("gpu_util", "util", fmt.ratio), Extra("gpu_power_w", "W", _n(0)))),
    ChartSpec("top1", "top-1", "quality_top1", _n(3), limit=_guard("quality_top1_min", upper=False)),
    ChartSpec("kl", "KL", "quality_kl", _n(3), limit=_guard("quality_kl_max", upper=True)),
)


class ChartRow(Horizontal):
    DEFAULT_CSS = """
    ChartRow { height: 1; }
    ChartRow > .title { width: 9; color: $text-muted; }
    ChartRow > Sparkline { width: 1fr; min-width: 8; margin: 0 1 0 0; }
    ChartRow > .values { width: 30; }
    """

    def __init__(self, spec: ChartSpec) -> None:
        super().__init__(id=f"chart-{spec.key}")
        self.spec = spec

    def compose(self) -> ComposeResult:
        yield Static(self.spec.title, classes="title")
        yield Sparkline([], summary_function=max)
        yield Static("", classes="values")

    def show(self, state: DashboardState, now: float) -> None:
        spec = self.spec
        data = state.series(spec.metric, now)
        sparks = self.query(Sparkline)
        if not sparks:  # a redraw can reach a row before its children are mounted; the next one draws it
            return
        spark = sparks.first()
        # An empty series draws a flat baseline; with no data at all say so in the numbers.
        spark.data = data
        value = state.latest(spec.metric)
        # one line of numbers in a short row; one number a line where the row is taller
        sep = "\n" if self.size.height > 1 else " "
        t = Text(no_wrap=True, overflow="ellipsis")
        limit = spec.limit(state)
        over = limit is not None and value is not None and (
            value > limit[1] if limit[2] else value < limit[1])
        t.append(spec.fmt(value), style="bold red" if over else "bold")
        if limit is not None:
            t.append(f" {limit[0]} {'≤' if limit[2] else '≥'}{spec.fmt(limit[1])}", style="dim")
        for extra in spec.extras:
            extra_value = state.latest(extra.metric)
            if extra_value is not None or extra.metric != "kv_compression_achieved":
                t.append(f"{sep}{extra.label} {extra.fmt(extra_value)}")
        if not data and value is None:
            t.append(f"{sep}no data", style="dim")
        self.query_one(".values", Static).update(t)


class ChartPanel(Vertical):
    DEFAULT_CSS = """
    ChartPanel { height: auto; }
    """

    def compose(self) -> ComposeResult:
        for spec in CHARTS:
            yield ChartRow(spec)

    def show(self, state: DashboardState, now: float) -> None:
        for row in self.query(ChartRow):
            row.show(state, now)
