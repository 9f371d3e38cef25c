"""`optd load`: a load generator speaking the OpenAI API, and the built-in load of `optd serve --demo`.

Requests arrive as a Poisson process at `rate` per second (`inf`: all at once), at most `concurrency`
in flight (an arrival that finds the cap reached waits for a slot), until `num_requests` were sent or
`duration` seconds passed (both None: until cancelled). Each is a streaming `POST /v1/completions`
with `stream_options.include_usage`, timed on the client: TTFT is send -> first token chunk, ITL the
gaps between token chunks (the server streams one chunk per token; speculative decoding delivers
them in bursts), TPOT a request's mean ITL, E2E send -> `[DONE]`.

Lengths are distributions, written `N` or `fixed:N`, `uniform:A-B` (integers, both ends included) or
`normal:MEAN,STD` (rounded); every draw is clamped to >= 1. Output lengths are `max_tokens`; the
model may stop earlier (the report counts the tokens the server says it generated). Prompt lengths
are in tokens of the bundled demo tokenizer: a prompt is a window of that many tokens of Python
standard-library source (the demo model's training corpus), so the demo model sees sensible text;
other models' tokenizers count somewhat differently, and the report gives the server's own count.

A trace (JSONL) replaces the distributions line by line: `{"prompt": "def f(x):", "max_tokens": 64,
"delay_s": 0.5}`. Every field is optional: `prompt` (text) or `prompt_tokens` (a length to
synthesize) else one drawn from `prompt_len`; `max_tokens` else drawn from `output_len`; `delay_s`
(seconds after the previous arrival) else a Poisson gap at `rate`. Unknown fields are rejected.

Goodput counts a request that succeeded with TTFT <= `slo_ttft` and TPOT <= `slo_itl` (the
daemon's own telemetry uses the same rule); the defaults are the balanced policy's SLO, 800 ms / 60 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import logging
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from optd.policies.stats import percentile

if TYPE_CHECKING:
    import httpx
    import uvicorn

log = logging.getLogger("optd.load")

DEFAULT_SLO_TTFT_S = 0.8   # the balanced policy (DESIGN.md): ttft_p95 800ms
DEFAULT_SLO_ITL_S = 0.06   # ... itl_p95 60ms

# ---------------------------------------------------------------------------------------------------
# The spec


class Dist(BaseModel):
    """A length distribution; built from its text form (`fixed:N`, `uniform:A-B`, `normal:MEAN,STD`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fixed", "uniform", "normal"]
    a: float   # fixed: N; uniform: low end; normal: mean
    b: float   # fixed: N; uniform: high end; normal: standard deviation

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        return cls._parse(data) if isinstance(data, str | int) else data

    @model_validator(mode="after")
    def _sane(self) -> Dist:
        if self.kind == "fixed" and self.a < 1:
            raise ValueError(f"fixed length must be >= 1 (got {self.a:g})")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise ValueError(f"uniform:A-B needs 1 <= A <= B (got {self.a:g}-{self.b:g})")
        if self.kind == "normal" and (self.a < 1 or self.b < 0):
            raise ValueError(f"normal:MEAN,STD needs MEAN >= 1 and STD >= 0 (got {self.a:g},{self.b:g})")
        return self

    @staticmethod
    def _parse(text: str | int) -> dict:
        s = str(text).strip()
        num = r"\d+(?:\.\d+)?"
        if m := re.fullmatch(r"(?:fixed:)?(\d+)", s):
            return {"kind": "fixed", "a": int(m[1]), "b": int(m[1])}
        if m := re.fullmatch(r"uniform:(\d+)-(\d+)", s):
            return {"kind": "uniform", "a": int(m[1]), "b": int(m[2])}
        if m := re.fullmatch(rf"normal:({num}),({num})", s):
            return {"kind": "normal", "a": float(m[1]), "b": float(m[2])}
        raise ValueError(f"expected N, fixed:N, uniform:A-B or normal:MEAN,STD (got {s!r})")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            n = self.a
        elif self.kind == "uniform":
            n = rng.randint(int(self.a), int(self.b))
        else:
            n = round(rng.gauss(self.a, self.b))
        return max(1, int(n))


class LoadSpec(BaseModel):
    """What to send. Field names are the `optd load` options (`num_requests` is `--num-requests`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "http://127.0.0.1:8000"
    model: str | None = None                   # None: the first of GET /v1/models
    rate: float = Field(2.0, gt=0)             # requests/s, Poisson; inf: all at once
    concurrency: int = Field(16, ge=1)
    num_requests: int | None = Field(None, ge=1)
    duration: float | None = Field(None, gt=0)  # seconds
    prompt_len: Dist = Dist(kind="uniform", a=32, b=128)
    output_len: Dist = Dist(kind="uniform", a=32, b=128)
    trace: Path | None = None
    temperature: float = Field(1.0, ge=0)
    seed: int | None = None
    slo_ttft: float = Field(DEFAULT_SLO_TTFT_S, gt=0)
    slo_itl: float = Field(DEFAULT_SLO_ITL_S, gt=0)
    timeout: float = Field(300.0, gt=0)        # per request, seconds


def spec_from_options(options: dict[str, Any]) -> LoadSpec:
    """A LoadSpec from option values (None: not given); errors name the option (`--num-requests`)."""
    try:
        return LoadSpec.model_validate({k: v for k, v in options.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise ValueError(f"{option}: {first['msg'].removeprefix('Value error, ')}") from None


def seconds(text: str) -> float:
    """`0.8`, `800ms`, `30s`, `2m` -> seconds (for argparse `type=`)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|inf)\s*(ms|s|m)?\s*", text)
    if not m:
        raise ValueError(f"expected seconds, e.g. 0.8, 800ms, 30s or 2m (got {text!r})")
    return float(m[1]) * {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[m[2]]


# ---------------------------------------------------------------------------------------------------
# Prompts and the request plan


class TraceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1)
    prompt_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    delay_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_prompt(self) -> TraceEntry:
        if self.prompt is not None and self.prompt_tokens is not None:
            raise ValueError("give prompt or prompt_tokens, not both")
        return self


def read_trace(path: Path) -> list[TraceEntry]:
    """The trace's entries; a bad line raises ValueError naming `file:line: field`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the trace: {getattr(e, 'strerror', None) or e}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
        try:
            entries.append(TraceEntry.model_validate(data))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            why = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            why = why.removeprefix("Value error, ")
            raise ValueError(f"{path}:{number}: {where + ': ' if where else ''}{why}") from None
    if not entries:
        raise ValueError(f"{path}: the trace has no requests")
    return entries


# Standard-library modules whose source makes the prompts (the demo model learnt from such text).
_CORPUS_MODULES = ("textwrap", "string", "functools", "json.decoder", "json.encoder", "shlex",
                   "fractions", "dataclasses", "argparse", "collections")


class PromptMaker:
    """Prompts of about N demo-tokenizer tokens: windows of Python standard-library source that start
    at a line start."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer  # a core dependency; needs no torch

        spec = importlib.util.find_spec("optd.engine")  # the folder, without importing the engine
        folder = Path(next(iter(spec.submodule_search_locations)))
        tokenizer = Tokenizer.from_file(str(folder / "demo" / "target" / "tokenizer.json"))
        texts = []
        for name in _CORPUS_MODULES:
            found = importlib.util.find_spec(name)
            if found is not None and found.origin and found.origin.endswith(".py"):
                texts.append(Path(found.origin).read_text(encoding="utf-8", errors="replace"))
        self.text = "\n".join(texts)
        encoding = tokenizer.encode(self.text)
        self.offsets = encoding.offsets
        # Token indices whose token begins a line: a prompt starting mid-identifier reads badly.
        starts = [i for i, (a, _) in enumerate(self.offsets) if a == 0 or self.text[a - 1] == "\n"]
        self.line_starts = starts or [0]

    def make(self, n_tokens: int, rng: random.Random) -> str:
        total = len(self.offsets)
        if n_tokens >= total:  # longer than the whole corpus (no model takes that much): repeat it
            return self.text * -(-n_tokens // total)
        fitting = [i for i in self.line_starts if i + n_tokens <= total] or [0]
        start = fitting[rng.randrange(len(fitting))]
        return self.text[self.offsets[start][0] : self.offsets[start + n_tokens - 1][1]]


@cache
def prompt_maker() -> PromptMaker:
    return PromptMaker()


@dataclass(frozen=True)
class Planned:
    index: int
    at_s: float          # arrival, seconds after the start
    prompt: str
    max_tokens: int
    seed: int | None


def plan(spec: LoadSpec, trace: list[TraceEntry] | None = None) -> Iterator[Planned]:
    """The requests in arrival order; stops at num_requests, the trace's end, or the duration."""
    # One generator per stream, so changing one distribution leaves the others' draws alone.
    rngs = {k: random.Random(f"{spec.seed}:{k}") if spec.seed is not None else random.Random()
            for k in ("arrivals", "prompts", "outputs", "seeds")}
    at, index = 0.0, 0
    while spec.num_requests is None or index < spec.num_requests:
        entry = trace[index] if trace is not None and index < len(trace) else None
        if trace is not None and entry is None:
            return
        if index:
            gap = entry.delay_s if entry is not None and entry.delay_s is not None else None
            if gap is None:
                gap = 0.0 if math.isinf(spec.rate) else rngs["arrivals"].expovariate(spec.rate)
            at += gap
        if spec.duration is not None and at >= spec.duration:
            return
        if entry is not None and entry.prompt is not None:
            prompt = entry.prompt
        else:
            n = entry.prompt_tokens if entry is not None and entry.prompt_tokens else None
            prompt = prompt_maker().make(n or spec.prompt_len.sample(rngs["prompts"]), rngs["prompts"])
        max_tokens = (entry.max_tokens if entry is not None and entry.max_tokens
                      else spec.output_len.sample(rngs["outputs"]))
        seed = rngs["seeds"].randrange(2**31) if spec.seed is not None else None
        yield Planned(index, at, prompt, max_tokens, seed)
        index += 1


# ---------------------------------------------------------------------------------------------------
# Sending


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    status: str                    # "200", an HTTP status such as "429", or "connection", "stream", ...
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None

    @property
    def mean_itl_s(self) -> float | None:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None

    def meets(self, slo_ttft: float, slo_itl: float) -> bool:
        mean = self.mean_itl_s
        return (self.ok and self.ttft_s is not None and self.ttft_s <= slo_ttft
                and (mean is None or mean <= slo_itl))


async def resolve_model(client: httpx.AsyncClient, spec: LoadSpec) -> str:
    import httpx

    try:
        response = await client.get("/v1/models", timeout=30)
    except httpx.HTTPError as e:
        raise ConnectionError(f"cannot reach the server at {spec.url}: {e or type(e).__name__}") from None
    if response.status_code != 200:
        raise ConnectionError(f"GET {spec.url}/v1/models answered {response.status_code}")
    served = [card["id"] for card in response.json().get("data", [])]
    if spec.model is None:
        if not served:
            raise ConnectionError(f"{spec.url} serves no model")
        return served[0]
    if spec.model not in served:
        raise ValueError(f"--model: {spec.model!r} is not served at {spec.url} (it serves {served})")
    return spec.model


async def send(client: httpx.AsyncClient, model: str, item: Planned, spec: LoadSpec) -> Result:
    import httpx

    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": spec.temperature}
    if item.seed is not None:
        body["seed"] = item.seed
    start = time.perf_counter()
    chunks: list[float] = []
    usage: dict | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=spec.timeout) as r:
            if r.status_code != 200:
                return Result(False, str(r.status_code), _error_message(await r.aread()))
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    chunks.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]
            if not done:
                return Result(False, "stream", "the stream ended without [DONE]")
            end = time.perf_counter()
            # Servers without include_usage: one chunk per token is the best count available.
            tokens = int(usage["completion_tokens"]) if usage else len(chunks)
            prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
    except httpx.TimeoutException as e:
        return Result(False, "timeout", f"{type(e).__name__}: {e}")
    except httpx.HTTPError as e:
        return Result(False, "connection", f"{type(e).__name__}: {e}")
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # not the OpenAI stream format
        return Result(False, "stream", f"malformed stream chunk: {type(e).__name__}: {e}")
    return Result(True, "200", prompt_tokens=prompt_tokens, output_tokens=tokens,
                  ttft_s=chunks[0] - start if chunks else None,
                  itl_s=[b - a for a, b in itertools.pairwise(chunks)], e2e_s=end - start)


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second (only on a terminal;
    elsewhere it stays silent rather than filling a log with carriage returns)."""

    def __init__(self, total: int | None, duration: float | None, stream=None):
        self.total, self.duration = total, duration
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.ok = self.failed = 0
        self.start = time.perf_counter()
        self.drawn = 0.0

    def update(self, result: Result) -> None:
        self.ok += result.ok
        self.failed += not result.ok
        now = time.perf_counter()
        if now - self.drawn >= 0.1:
            self.draw(now)

    def draw(self, now: float) -> None:
        if not self.enabled:
            return
        self.drawn = now
        elapsed, done = now - self.start, self.ok + self.failed
        fraction = (done / self.total if self.total
                    else min(elapsed / self.duration, 1.0) if self.duration else 0.0)
        width = 30
        bar = "=" * int(fraction * width)
        count = f"{done}/{self.total}" if self.total else f"{done}"
        self.stream.write(f"\rload [{bar:<{width}}] {count} ok {self.ok} failed {self.failed} "
                          f"{elapsed:5.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


async def run_load(spec: LoadSpec, *, progress: Progress | None = None,
                   on_result: Callable[[Result], None] | None = None) -> LoadReport:
    """Send the load of `spec` and report on it. Raises ConnectionError when the server cannot be
    reached, ValueError for a bad trace or model; failed requests are counted, not raised."""
    import httpx  # here, not at the top: every `optd` command builds its parser from this module
    trace = read_trace(spec.trace) if spec.trace is not None else None
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    async with httpx.AsyncClient(base_url=spec.url, limits=limits, timeout=spec.timeout) as client:
        model = await resolve_model(client, spec)
        results: list[Result] = []
        slots = asyncio.Semaphore(spec.concurrency)

        async def one(item: Planned) -> None:
            try:
                result = await send(client, model, item, spec)
            finally:
                slots.release()
            results.append(result)
            if progress is not None:
                progress.update(result)
            if on_result is not None:
                on_result(result)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for item in plan(spec, trace):
                if (wait := start + item.at_s - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                await slots.acquire()  # at the cap, the arrival waits for a slot
                if spec.duration is not None and time.perf_counter() - start >= spec.duration:
                    slots.release()
                    break
                group.create_task(one(item))
        elapsed = time.perf_counter() - start
    if progress is not None:
        progress.close()
    return summarize(results, elapsed, spec, model)


# ---------------------------------------------------------------------------------------------------
# The report


class Latency(BaseModel):
    """Seconds; None when nothing was measured."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float]) -> Latency:
        mean = sum(values) / len(values) if values else None
        return cls(count=len(values), mean=mean, p50=percentile(values, 50), p95=percentile(values, 95),
                   p99=percentile(values, 99))


class LoadReport(BaseModel):
    url: str
    model: str
    duration_s: float
    requests: int
    ok: int
    failed: int
    failures: dict[str, int]          # by status: "429", "400", "connection", "stream", ...
    failure_examples: dict[str, str]  # one message per status
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: Latency
    itl_s: Latency                    # every gap between two tokens (speculation delivers in bursts)
    tpot_s: Latency                   # per request: its mean ITL, what the goodput SLO checks
    e2e_s: Latency
    slo_ttft_s: float
    slo_itl_s: float
    goodput_tokens_per_s: float
    goodput_requests: int
    goodput_share: float              # of all requests sent; a failed one never meets the SLO


def summarize(results: list[Result], elapsed: float, spec: LoadSpec, model: str) -> LoadReport:
    ok = [r for r in results if r.ok]
    failures = Counter(r.status for r in results if not r.ok)
    examples = {}
    for r in results:
        if not r.ok and r.status not in examples:
            examples[r.status] = r.error or ""
    good = [r for r in ok if r.meets(spec.slo_ttft, spec.slo_itl)]
    per_s = 1.0 / elapsed if elapsed > 0 else 0.0
    output_tokens = sum(r.output_tokens for r in ok)
    return LoadReport(
        url=spec.url, model=model, duration_s=elapsed, requests=len(results), ok=len(ok),
        failed=len(results) - len(ok), failures=dict(sorted(failures.items())), failure_examples=examples,
        prompt_tokens=sum(r.prompt_tokens for r in ok), output_tokens=output_tokens,
        output_tokens_per_s=output_tokens * per_s, requests_per_s=len(ok) * per_s,
        ttft_s=Latency.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_s=Latency.of([gap for r in ok for gap in r.itl_s]),
        tpot_s=Latency.of([m for r in ok if (m := r.mean_itl_s) is not None]),
        e2e_s=Latency.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo_ttft_s=spec.slo_ttft, slo_itl_s=spec.slo_itl,
        goodput_tokens_per_s=sum(r.output_tokens for r in good) * per_s, goodput_requests=len(good),
        goodput_share=len(good) / len(results) if results else 0.0)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def render(report: LoadReport) -> str:
    r = report
    failed = f"failed {r.failed}"
    if r.failures:
        failed += " (" + ", ".join(f"{status}: {n}" for status, n in r.failures.items()) + ")"
    lines = [
        f"{r.url}  model {r.model}  {r.requests} requests in {r.duration_s:.2f} s",
        f"requests      ok {r.ok}   {failed}",
        f"throughput    {r.output_tokens_per_s:.1f} output tokens/s   {r.requests_per_s:.2f} requests/s"
        f"   ({r.prompt_tokens} prompt, {r.output_tokens} output tokens)",
        f"{'latency (ms)':<14}{'p50':>9}{'p95':>9}{'p99':>9}",
        *(f"  {name:<12}{_ms(lat.p50):>9}{_ms(lat.p95):>9}{_ms(lat.p99):>9}"
          for name, lat in (("TTFT", r.ttft_s), ("ITL", r.itl_s), ("TPOT", r.tpot_s), ("E2E", r.e2e_s))),
        f"goodput       {r.goodput_tokens_per_s:.1f} tokens/s, {r.goodput_requests}/{r.requests} requests "
        f"({r.goodput_share:.0%}) within TTFT <= {r.slo_ttft_s * 1000:g} ms and TPOT <= "
        f"{r.slo_itl_s * 1000:g} ms",
    ]
    lines += [f"  {status}: {message}" for status, message in r.failure_examples.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# `optd load`


def _option_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse `type=` whose ValueError becomes argparse's own error (exit 2, naming the option)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValidationError as e:
            raise argparse.ArgumentTypeError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    dist = _option_type(Dist.model_validate, "distribution")
    duration = _option_type(seconds, "duration")
    p.add_argument("--url", default=None, help="the server's base URL (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests per second, Poisson arrivals; 'inf' sends all at once (default 2)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default 16)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--num-requests", type=int, default=None, help="requests to send (default 50)")
    stop.add_argument("--duration", type=duration, default=None, help="send for this long: 30s, 2m")
    p.add_argument("--prompt-len", type=dist, default=None,
                   help="prompt tokens: N, uniform:A-B or normal:MEAN,STD (default uniform:32-128)")
    p.add_argument("--output-len", type=dist, default=None,
                   help="max_tokens per request, same forms (default uniform:32-128)")
    p.add_argument("--trace", type=Path, default=None,
                   help='JSONL, one request a line: {"prompt" | "prompt_tokens", "max_tokens", "delay_s"}')
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="makes arrivals, lengths, prompts reproducible")
    p.add_argument("--slo-ttft", type=duration, default=None, help="TTFT SLO for goodput (default 800ms)")
    p.add_argument("--slo-itl", type=duration, default=None, help="mean ITL SLO for goodput (default 60ms)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_cli(args: argparse.Namespace) -> int:
    """`optd load`: 0 when requests succeeded, 1 when the server is unreachable or none succeeded,
    2 for a bad option or trace (ValueError, which the CLI turns into exit 2)."""
    options = {name: getattr(args, name) for name in LoadSpec.model_fields if hasattr(args, name)}
    if args.num_requests is None and args.duration is None and args.trace is None:
        options["num_requests"] = 50
    spec = spec_from_options(options)
    trace_total = len(read_trace(spec.trace)) if spec.trace is not None else None  # bad trace: exit 2 now
    bounds = [n for n in (spec.num_requests, trace_total) if n is not None]
    total = min(bounds) if bounds else None
    progress = None if args.no_progress else Progress(total, spec.duration)
    report = asyncio.run(run_load(spec, progress=progress))
    print(report.model_dump_json(indent=2) if args.json else render(report))
    if report.ok == 0:
        print(f"optd load: no request succeeded ({report.failed} failed)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------
# `optd serve --demo`

# Config defaults under `--demo`: the bundled pair with speculation on (the balanced preset's start);
# the config file, OPTD_* variables and flags still override them.
DEMO_CONFIG: dict[str, Any] = {"engine": {"model": "demo", "draft_model": "demo-draft"},
                               "knobs": {"spec_length": 4}}
# A modest, never-ending load: a newcomer sees numbers move without the machine being swamped.
DEMO_LOAD = LoadSpec(rate=0.5, concurrency=4, prompt_len="uniform:16-64", output_len="uniform:16-64",
                     temperature=0.8)
DEMO_SUMMARY_EVERY_S = 30.0


def start_demo_load(server: uvicorn.Server, every_s: float = DEMO_SUMMARY_EVERY_S) -> asyncio.Task:
    """The demo load as a task: it starts once `server` listens, sends DEMO_LOAD to it and logs a
    summary line every `every_s`. Cancel it before draining, so its requests do not hold the drain."""
    return asyncio.create_task(_demo_load(server, every_s), name="optd-demo-load")


async def _demo_load(server: uvicorn.Server, every_s: float) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    if host in ("0.0.0.0", "::"):  # bound everywhere: talk to ourselves over loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    spec = DEMO_LOAD.model_copy(update={"url": url})
    window: list[Result] = []
    log.info("demo load: %.1f requests/s at most %d at once against %s", spec.rate, spec.concurrency, url)

    async def report_every() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(every_s)
            report = summarize(list(window), time.perf_counter() - started, spec, "(demo load)")
            window.clear()
            log.info("demo load: %s", summary_line(report))

    reporter = asyncio.create_task(report_every())
    try:
        await run_load(spec, on_result=window.append)
    except Exception:  # the daemon keeps serving without its demo load
        log.exception("demo load stopped")
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


def summary_line(report: LoadReport) -> str:
    r = report
    return (f"{r.ok} ok, {r.failed} failed in {r.duration_s:.0f} s, {r.output_tokens_per_s:.1f} tokens/s, "
            f"TTFT p95 {_ms(r.ttft_s.p95)} ms, ITL p95 {_ms(r.itl_s.p95)} ms, "
            f"goodput {r.goodput_share:.0%}")
