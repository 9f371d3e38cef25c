"""The policy expression language: a safe evaluator, never eval.

Grammar (DESIGN.md): metric names, numbers, durations, `+ - * /`, comparisons (chains allowed),
`and or not`, parentheses, `slo.ttft_p95|itl_p95|e2e_p95`, and functions `last(m)`,
`avg|min|max|p50|p95|p99(m, window)`, `rate(m, window)`. A bare metric name means `last(m)`.

How it is parsed: durations are not Python, so first a regex replaces every duration literal
(`800ms`, `30s`, `5m`, `1h`: a number directly followed by a unit, not part of a name such as p95)
with a placeholder name `__optd_d<N>` whose value is remembered; then `ast.parse(..., mode="eval")`
builds the tree and a whitelist walk turns it into a tree of small Python closures. Any node type
not in the whitelist (attribute access other than slo.X, subscripts, lambdas, keywords, strings, ...)
is an error at compile time, naming the expression's document path. Nothing is ever executed by
Python's compiler: ast.parse only parses.

Evaluation is three-valued: a metric with no data (or a window with no samples, or a division by
zero) gives None, and None spreads through arithmetic and comparisons; `and` is False if any side
is False, else None if any side is None; `or` likewise with True. A rule whose condition is None
does not fire.
"""

import ast
import bisect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from optd.policies.durations import DURATION_RE, UNITS
from optd.policies.errors import PolicyError
from optd.policies.metrics import METRIC_NAMES, SampleWindow
from optd.policies.stats import percentile

SLO_NAMES = ("ttft_p95", "itl_p95", "e2e_p95")
WINDOW_FUNCTIONS = ("avg", "min", "max", "p50", "p95", "p99", "rate")
FUNCTIONS = ("last", *WINDOW_FUNCTIONS)
MAX_LENGTH = 2000
MAX_DEPTH = 64
_PLACEHOLDER = "__optd_d"
# A duration literal not glued to a preceding name, number or dot (so p95, x1s, 1.5s stay whole).
_DURATION_TOKEN = re.compile(r"(?<![\w.])" + DURATION_RE.pattern + r"(?![\w.])")

Value = float | bool | None
Node = Callable[["_Context"], Value]


@dataclass
class _Context:
    window: SampleWindow
    now: float | None
    slo: Mapping[str, float | None]


@dataclass(frozen=True)
class Expression:
    """A compiled expression: `evaluate` it against a SampleWindow."""

    text: str
    metrics: frozenset[str]
    is_condition: bool                    # True when it yields a bool (what `when` needs)
    slo: Mapping[str, float | None] = field(default_factory=dict, compare=False)
    _root: Node = field(default=lambda ctx: None, repr=False, compare=False)

    def evaluate(self, window: SampleWindow, now: float | None = None,
                 slo: Mapping[str, float | None] | None = None) -> Value:
        """The value, or None where a needed metric has no data. `slo` overrides the bound SLO."""
        return self._root(_Context(window, now, self.slo if slo is None else slo))


def compile_expression(text: str, path: str = "", *,
                       slo: Mapping[str, float | None] | None = None) -> Expression:
    """Parse and check `text`; PolicyError (naming `path`) for anything outside the language.

    `slo` binds the values `slo.ttft_p95` etc. read (the loader passes the policy's SLO).
    """
    if not isinstance(text, str):
        raise PolicyError(f"expected an expression (text), got {text!r}", path)
    if len(text) > MAX_LENGTH:
        raise PolicyError(f"expression longer than {MAX_LENGTH} characters", path)
    if _PLACEHOLDER in text:
        raise PolicyError(f"names starting with {_PLACEHOLDER} are reserved", path)
    durations: dict[str, float] = {}

    def replace(match: re.Match) -> str:
        name = f"{_PLACEHOLDER}{len(durations)}"
        durations[name] = float(match.group(1)) * UNITS[match.group(2)]
        if not math.isfinite(durations[name]):
            raise PolicyError(f"duration {match.group(0)[:20]!r}... is too large", path)
        return name

    source = _DURATION_TOKEN.sub(replace, text)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as e:
        raise PolicyError(f"malformed expression {text!r}: {e.msg}", path) from None
    except (ValueError, RecursionError, MemoryError):
        raise PolicyError(f"malformed expression {text!r}", path) from None
    if _depth(tree) > MAX_DEPTH:
        raise PolicyError(f"expression nests deeper than {MAX_DEPTH} levels", path)
    compiler = _Compiler(text, path, durations)
    root, kind = compiler.compile(tree.body)
    return Expression(text=text, metrics=frozenset(compiler.metrics), is_condition=kind == "bool",
                      slo=dict(slo or {}), _root=root)


def _depth(tree: ast.AST) -> int:
    # Iterative, so a pathological expression cannot exhaust Python's recursion limit here.
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


_ARITH = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
          ast.Div: lambda a, b: a / b if b != 0 else None}
_COMPARE = {ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b,
            ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}
_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Lt: "<", ast.LtE: "<=",
            ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


class _Compiler:
    """Whitelist walk from ast nodes to closures, typing each node as "num" or "bool"."""

    def __init__(self, text: str, path: str, durations: dict[str, float]):
        self.text, self.path, self.durations = text, path, durations
        self.metrics: set[str] = set()

    def fail(self, message: str) -> PolicyError:
        return PolicyError(f"{message} in {self.text!r}", self.path)

    def compile(self, node: ast.expr) -> tuple[Node, str]:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise self.fail(f"{node.value!r} is not allowed (only numbers and durations)")
            try:
                value = float(node.value)
            except OverflowError:
                raise self.fail("number too large") from None
            if not math.isfinite(value):
                raise self.fail("numbers must be finite")
            return (lambda ctx: value), "num"
        if isinstance(node, ast.Name):
            if node.id in self.durations:
                value = self.durations[node.id]
                return (lambda ctx: value), "num"
            metric = self.metric(node)
            return (lambda ctx: _last(ctx, metric)), "num"
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == "slo"):
                raise self.fail("attribute access is not allowed (only slo.<name>)")
            if node.attr not in SLO_NAMES:
                raise self.fail(f"unknown SLO {node.attr!r} (known: {', '.join(SLO_NAMES)})")
            attr = node.attr
            return (lambda ctx: ctx.slo.get(attr)), "num"
        if isinstance(node, ast.UnaryOp):
            operand, kind = self.compile(node.operand)
            if isinstance(node.op, ast.Not):
                self.want(kind, "bool", "not")
                return (lambda ctx: _not(operand(ctx))), "bool"
            if isinstance(node.op, ast.USub | ast.UAdd):
                self.want(kind, "num", "unary -/+")
                sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
                return (lambda ctx: _num_op(lambda a: sign * a, operand(ctx))), "num"
            raise self.fail(f"operator {type(node.op).__name__} is not allowed")
        if isinstance(node, ast.BinOp):
            op = _ARITH.get(type(node.op))
            if op is None:
                raise self.fail(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
            (left, lk), (right, rk) = self.compile(node.left), self.compile(node.right)
            self.want(lk, "num", _SYMBOLS[type(node.op)])
            self.want(rk, "num", _SYMBOLS[type(node.op)])
            return (lambda ctx: _binary(op, left(ctx), right(ctx))), "num"
        if isinstance(node, ast.BoolOp):
            parts = []
            word = "and" if isinstance(node.op, ast.And) else "or"
            for value in node.values:
                part, kind = self.compile(value)
                self.want(kind, "bool", word)
                parts.append(part)
            combine = _and if word == "and" else _or
            return (lambda ctx: combine(p(ctx) for p in parts)), "bool"
        if isinstance(node, ast.Compare):
            compiled = []
            for operand in [node.left, *node.comparators]:
                fn, kind = self.compile(operand)
                self.want(kind, "num", _SYMBOLS.get(type(node.ops[0]), "comparison"))
                compiled.append(fn)
            ops = []
            for op in node.ops:
                if type(op) not in _COMPARE:
                    raise self.fail(f"comparison {type(op).__name__} is not allowed")
                ops.append(_COMPARE[type(op)])
            return (lambda ctx: _compare(ops, [c(ctx) for c in compiled])), "bool"
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.fail(f"{type(node).__name__} is not allowed")

    def want(self, kind: str, wanted: str, where: str) -> None:
        if kind != wanted:
            what = "a number" if wanted == "num" else "a condition"
            got = "a condition" if kind == "bool" else "a number"
            raise self.fail(f"{where} needs {what}, got {got}")

    def metric(self, node: ast.expr) -> str:
        if not isinstance(node, ast.Name) or node.id in self.durations:
            raise self.fail("expected a metric name")
        if node.id not in METRIC_NAMES:
            hint = " (use slo.<name> for SLO values)" if node.id == "slo" else ""
            raise self.fail(f"unknown metric {node.id!r}{hint}")
        self.metrics.add(node.id)
        return node.id

    def call(self, node: ast.Call) -> tuple[Node, str]:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise self.fail(f"unknown function {name!r} (functions: {', '.join(FUNCTIONS)})")
        name = node.func.id
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(f"{name}() takes positional arguments only")
        arity = 1 if name == "last" else 2
        if len(node.args) != arity:
            usage = f"{name}(metric)" if arity == 1 else f"{name}(metric, window)"
            raise self.fail(f"{name}() takes {arity} argument{'s' if arity > 1 else ''}: {usage}, "
                            f"got {len(node.args)}")
        metric = self.metric(node.args[0])
        if name == "last":
            return (lambda ctx: _last(ctx, metric)), "num"
        seconds = self.window_seconds(node.args[1], name)
        if name == "rate":
            return (lambda ctx: _rate(ctx, metric, seconds)), "num"
        reduce = _REDUCERS[name]
        return (lambda ctx: reduce(ctx.window.window(metric, seconds, ctx.now))), "num"

    def window_seconds(self, node: ast.expr, name: str) -> float:
        if isinstance(node, ast.Name) and node.id in self.durations:
            seconds = self.durations[node.id]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, int | float)
              and not isinstance(node.value, bool)):
            seconds = float(node.value)  # a bare number of seconds, as durations allow elsewhere
        else:
            raise self.fail(f"the window of {name}() must be a duration like 30s or 5m")
        if not (math.isfinite(seconds) and seconds > 0):
            raise self.fail(f"the window of {name}() must be longer than 0s")
        return seconds


def _not(a: Value) -> Value:
    return None if a is None else not a


def _num_op(fn: Callable[[float], float], a: Value) -> Value:
    return None if a is None else fn(a)


def _binary(op: Callable[[float, float], float | None], a: Value, b: Value) -> Value:
    if a is None or b is None:
        return None
    result = op(a, b)
    return result if result is None or math.isfinite(result) else None


def _compare(ops: list[Callable[[float, float], bool]], values: list[Value]) -> Value:
    # A chain a < b < c is (a < b) and (b < c), three-valued like `and`.
    return _and(None if values[i] is None or values[i + 1] is None else op(values[i], values[i + 1])
                for i, op in enumerate(ops))


def _and(values) -> Value:
    unknown = False
    for v in values:
        if v is False:
            return False
        unknown |= v is None
    return None if unknown else True


def _or(values) -> Value:
    unknown = False
    for v in values:
        if v is True:
            return True
        unknown |= v is None
    return None if unknown else False


_REDUCERS: dict[str, Callable[[list[float]], float | None]] = {
    "avg": lambda v: sum(v) / len(v) if v else None,
    "min": lambda v: min(v) if v else None,
    "max": lambda v: max(v) if v else None,
    "p50": lambda v: percentile(v, 50),
    "p95": lambda v: percentile(v, 95),
    "p99": lambda v: percentile(v, 99),
}


def _rate(ctx: _Context, metric: str, seconds: float) -> float | None:
    """Change per second between the oldest and newest sample of `metric` in the window."""
    samples = ctx.window.samples()
    if not samples:
        return None
    now = ctx.now if ctx.now is not None else samples[-1].get("ts")
    if now is None:
        return None
    points = _points(samples, metric, now - seconds, now)
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    (t0, v0), (t1, v1) = points[0], points[-1]
    return (v1 - v0) / (t1 - t0)


def _points(samples: list[dict], metric: str, start: float, end: float) -> list[tuple[float, float]]:
    # Samples are oldest first: bisect on ts to the window, then keep those with a value.
    stamps = [s.get("ts") or 0.0 for s in samples]
    lo, hi = bisect.bisect_right(stamps, start), bisect.bisect_right(stamps, end)
    return [(s["ts"], s[metric]) for s in samples[lo:hi] if s.get(metric) is not None]


def _last(ctx: "_Context", metric: str) -> float | None:
    """The newest value at or before `now` (a replay evaluates against samples from its future too)."""
    if ctx.now is None:
        return ctx.window.last(metric)
    values = ctx.window.window(metric, math.inf, ctx.now)
    return values[-1] if values else None
