"""Telemetry: samples from a real engine (demo model), the ring buffer, the APScheduler job into a real
store, device stats on whatever this machine has."""

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from optd.daemon import db
from optd.daemon.config import ConfigError, load_config
from optd.daemon.devices import DeviceProbe
from optd.daemon.request_log import FinishedBuffer, FinishedRequest
from optd.daemon.store import Store
from optd.daemon.telemetry import (
    SAMPLE_FIELDS,
    SLO,
    RingBuffer,
    Sampler,
    TelemetryJob,
    new_items,
    percentile,
)
from optd.engine import Engine, EngineConfig, SamplingParams
from optd.engine.outputs import EngineStats

PROMPTS = ["def foo(", "import os\n", "class A:", "for i in range("]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def engine():
    with Engine(EngineConfig(model="demo", max_num_seqs=4)) as e:
        yield e


@pytest.fixture(scope="module")
def spec_engine():
    with Engine(EngineConfig(model="demo", draft_model="ngram", max_num_seqs=4)) as e:
        yield e


def _sampler(engine, clock, **kw):
    return Sampler(engine.stats, lambda: engine.knobs, DeviceProbe(), clock=clock, **kw)


def test_sample_rates_and_latencies_match_the_counters(engine):
    clock = Clock()
    sampler = _sampler(engine, clock)
    before = engine.stats()
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    clock.t += 2.0
    s = sampler.sample(now=1234.5)
    after = engine.stats()

    assert set(s) == set(SAMPLE_FIELDS)
    assert s["ts"] == 1234.5
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == after.generation_tokens_total - before.generation_tokens_total == 48
    assert s["tokens_per_s"] == pytest.approx(tokens / 2.0)
    assert s["requests_per_s"] == pytest.approx(len(PROMPTS) / 2.0)
    assert s["preemptions_per_s"] == 0
    assert s["goodput_tokens_per_s"] is None                       # no request log: no data
    ttfts = sorted(o.ttft_s for o in outs)
    assert ttfts[0] <= s["ttft_p50"] <= s["ttft_p95"] <= s["ttft_p99"] <= ttfts[-1] + 1e-3
    assert 0 < s["itl_p50"] <= s["itl_p95"] <= s["itl_p99"]
    assert s["e2e_p95"] >= s["ttft_p95"]
    assert s["requests_running"] == s["requests_waiting"] == 0
    assert s["kv_usage"] == 0.0                                   # all freed after the requests finished
    assert s["acceptance_rate"] is None and s["acceptance_length"] is None   # no drafter
    assert s["quality_top1"] is None and s["quality_kl"] is None
    assert s["max_batch_size"] == 4 and s["spec_length"] == 0 and s["weight_bits"] == 16
    assert s["process_rss_bytes"] > 10e6 and s["process_cpu_percent"] >= 0

    # An idle interval: zero rates, no latencies.
    clock.t += 0.5
    idle = sampler.sample()
    assert idle["tokens_per_s"] == idle["requests_per_s"] == 0
    assert all(idle[k] is None for k in ("ttft_p50", "ttft_p95", "itl_p99", "e2e_p95"))

    # Only the next interval's requests count in its percentiles.
    engine.generate(PROMPTS[:1], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    clock.t += 1.0
    one = sampler.sample()
    assert one["requests_per_s"] == 1.0 and one["tokens_per_s"] == 3.0
    assert one["ttft_p50"] == one["ttft_p99"] == engine.stats().ttft_s[-1]


T0 = 1_800_000_000.0


def finished(status="ok", ttft=0.1, gaps=(0.02,), tokens=None, request_id="cmpl-1") -> FinishedRequest:
    tokens = len(gaps) + 1 if tokens is None else tokens
    return FinishedRequest(request_id=request_id, endpoint="completions", streamed=False, status=status,
                           finish_reason="length", arrival=T0, finished_at=T0 + 1, prompt_tokens=3,
                           completion_tokens=tokens, ttft_s=ttft, e2e_s=1.0, itl_s=tuple(gaps),
                           itl_mean_s=sum(gaps) / len(gaps) if gaps else None,
                           itl_max_s=max(gaps) if gaps else None)


def test_goodput_counts_the_tokens_of_finished_requests_within_the_slo():
    clock = Clock()
    buffer = FinishedBuffer()
    sampler = Sampler(EngineStats, _knobs, clock=clock, slo=SLO(ttft_p95=0.5, itl_p95=0.05),
                      finished=buffer.drain)
    for r in [finished(ttft=0.2, gaps=[0.04] * 9),              # 10 tokens, meets both
              finished(ttft=0.9, gaps=[0.01] * 20),             # TTFT too slow
              finished(ttft=0.1, gaps=[0.01, 0.09] * 5),        # mean ITL 0.05: meets (a slow max is fine)
              finished(ttft=0.1, gaps=[0.06] * 4),              # ITL too slow
              finished(ttft=0.5, gaps=[], tokens=1),            # one token: no gap to check
              finished(status="aborted", ttft=0.1, gaps=[0.01] * 6),   # the client left: not goodput
              finished(status="error", ttft=0.1, gaps=[0.01] * 2)]:
        buffer(r)
    clock.t += 2.0
    assert sampler.sample()["goodput_tokens_per_s"] == pytest.approx((10 + 11 + 1) / 2.0)
    clock.t += 1.0
    assert sampler.sample()["goodput_tokens_per_s"] == 0.0          # drained: each request counts once
    buffer(finished(ttft=0.9, gaps=[0.5]))
    sampler.slo = SLO()                                             # no bounds: every ok request counts
    clock.t += 0.5
    assert sampler.sample()["goodput_tokens_per_s"] == 4.0


def test_finished_buffer_is_bounded_and_keeps_no_gaps():
    buffer = FinishedBuffer(capacity=2)
    for i in range(3):
        buffer(finished(request_id=f"cmpl-{i}", gaps=[0.01] * 50))
    drained = buffer.drain()
    assert [r.request_id for r in drained] == ["cmpl-1", "cmpl-2"] and buffer.dropped == 1
    assert drained[0].itl_s == () and drained[0].itl_mean_s == pytest.approx(0.01)
    assert buffer.drain() == []


def test_slo_from_the_config_section(tmp_path):
    path = tmp_path / "optd.yaml"
    path.write_text("slo: {ttft_p95_s: 0.000001, itl_p95_s: null}\n")
    config = load_config(path, default_path=tmp_path / "none.yaml")
    assert SLO.from_config(config.slo) == SLO(ttft_p95=1e-6, itl_p95=None)
    defaults = load_config(None, default_path=tmp_path / "none.yaml")
    assert SLO.from_config(defaults.slo) == SLO(ttft_p95=0.8, itl_p95=0.06)     # the balanced policy's
    path.write_text("slo: {ttft_p95_s: 0}\n")
    with pytest.raises(ConfigError, match=r"slo.ttft_p95_s: Input should be greater than 0"):
        load_config(path, default_path=tmp_path / "none.yaml")


def _knobs():
    from optd.engine.knobs import Knobs
    return Knobs(max_batch_size=2)


def test_acceptance_from_spec_counters(spec_engine):
    clock = Clock()
    spec_engine.apply(spec_length=4)
    sampler = Sampler(spec_engine.stats, lambda: spec_engine.knobs, clock=clock)
    before = spec_engine.stats()
    text = "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\ny = 2\n"     # repetitive: the n-gram drafter finds matches
    spec_engine.generate([text], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    clock.t += 1.0
    s = sampler.sample()
    after = spec_engine.stats()
    drafts = after.spec_drafts_total - before.spec_drafts_total
    proposed = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    assert s["spec_length"] == 4
    assert drafts > 0  # the prompt repeats itself: prompt lookup must propose
    assert s["acceptance_rate"] == pytest.approx(accepted / proposed)
    assert s["acceptance_length"] == pytest.approx(1 + accepted / drafts)
    assert 0 <= s["acceptance_rate"] <= 1 and 1 <= s["acceptance_length"] <= 5


def test_new_items_and_percentile():
    assert new_items([], [1.0, 2.0]) == [1.0, 2.0]
    assert new_items([1.0, 2.0], [1.0, 2.0, 3.0]) == [3.0]
    assert new_items([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == [4.0]        # bounded list shifted
    assert new_items([1.0, 2.0, 3.0], [5.0, 6.0, 7.0]) == [5.0, 6.0, 7.0]  # overflowed: all new
    assert new_items([1.0, 2.0], [1.0, 2.0]) == []
    assert percentile([], 95) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 95) == 95


def test_ring_buffer_windows():
    ring = RingBuffer(seconds=10, interval=1)
    for i in range(30):
        ring({"ts": 1000.0 + i, "tokens_per_s": float(i), "quality_top1": 0.99 if i == 5 else None})
    assert len(ring) == 12                                    # bounded: 10 s of 1 s samples, plus slack
    assert ring.window("tokens_per_s", 3) == [27.0, 28.0, 29.0]
    assert ring.window("tokens_per_s", 3, now=1025.0) == [23.0, 24.0, 25.0]
    assert ring.window("tokens_per_s", 100) == [float(i) for i in range(18, 30)]
    assert ring.window("nope", 5) == []
    assert ring.last("tokens_per_s") == 29.0
    assert ring.last("quality_top1") is None                  # fell out of the buffer
    ring({"ts": 1030.0, "tokens_per_s": None, "quality_top1": 0.98})
    assert ring.last("tokens_per_s") == 29.0 and ring.last("quality_top1") == 0.98
    assert ring.window("tokens_per_s", 2) == [29.0]
    assert RingBuffer(5, 1).window("x", 5) == [] and RingBuffer(5, 1).last("x") is None
    with pytest.raises(ValueError):
        RingBuffer(0, 1)


def test_device_probe_reports_its_fallback(caplog):
    with caplog.at_level(logging.INFO, logger="optd.daemon.devices"):
        probe = DeviceProbe()
    assert "device stats:" in caplog.text
    first, second = probe.read(), probe.read()
    assert set(first) == {"gpu_memory_used_ratio", "gpu_util", "gpu_power_w", "process_cpu_percent",
                          "process_rss_bytes"}
    if probe.backend == "none":
        assert first["gpu_util"] is None and first["gpu_memory_used_ratio"] is None
    else:
        assert 0 <= first["gpu_memory_used_ratio"] <= 1
    assert second["process_rss_bytes"] > 0
    probe.close()
    assert set(DeviceProbe(gpu=False).read()) == set(first)


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'optd.db'}"
    db.upgrade(url)
    with Store(url) as s:
        yield s


def test_job_samples_into_the_store_and_survives_a_bad_subscriber(engine, store, caplog):
    ring = RingBuffer(seconds=60, interval=0.5)
    seen: list[dict] = []

    def broken(sample):
        raise RuntimeError("subscriber bug")

    async def main() -> TelemetryJob:
        job = TelemetryJob(Sampler(engine.stats, lambda: engine.knobs, DeviceProbe()), interval_s=0.5,
                           subscribers=[broken, store.add_sample, ring, seen.append])
        job.start()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, lambda: engine.generate(
            PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)))
        await asyncio.sleep(2.6)
        await work
        job.shutdown()
        return job

    t0 = time.time()
    job = asyncio.run(main())
    store.flush()
    rows = store.recent_samples(since=t0 - 1)
    assert 4 <= len(rows) <= 6 and len(seen) == len(rows) == len(ring) == job.runs
    assert job.subscriber_errors == job.runs and "subscriber bug" in caplog.text
    assert set(rows[0]) == set(SAMPLE_FIELDS)
    assert sum(r["tokens_per_s"] for r in rows) > 0
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    assert ring.window("tokens_per_s", 60) == [r["tokens_per_s"] for r in rows]
    assert job.missed == job.skipped == job.lost == 0


def test_job_counts_runs_lost_to_a_blocked_loop(engine, caplog):
    async def main() -> TelemetryJob:
        job = TelemetryJob(Sampler(engine.stats, lambda: engine.knobs), interval_s=1.5, misfire_grace_time=1)
        job.start()
        while job.runs < 1:               # the first run, at ~1.5 s
            await asyncio.sleep(0.02)
        time.sleep(2.7)                   # block the loop: the run due at ~3.0 s starts ~1.2 s late
        while job.runs < 2:               # the next one, at ~4.5 s
            await asyncio.sleep(0.02)
        job.shutdown()
        return job

    job = asyncio.run(main())
    assert job.missed == 1 and job.skipped == 0
    assert job.lost == 1                  # one run time (3.0 s) produced no sample
    assert "missed" in caplog.text and "lost to a blocked event loop" in caplog.text


def test_the_daemon_records_requests_and_counts_no_goodput_under_an_impossible_slo(tmp_path):
    """`optd serve` wired end to end: the config's SLO reaches the sampler, request rows reach SQLite."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(1)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "OPTD_SLO__TTFT_P95_S": "0.000001",
           "OPTD_TELEMETRY__INTERVAL_S": "0.5"}
    command = [sys.executable, "-m", "optd.daemon.cli", "serve", "--state-dir", str(tmp_path), "--port", "0"]
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        message, deadline = "", time.monotonic() + 120
        while "READY=1" not in message:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            with contextlib.suppress(TimeoutError):
                message = notify.recv(4096).decode()
        base = f"http://127.0.0.1:{int(message.rsplit(':', 1)[1].split()[0])}"
        usage = []
        for stream in (False, True):
            body = {"model": "demo", "prompt": "def f(x):", "max_tokens": 6, "stream": stream,
                    "stream_options": {"include_usage": True} if stream else None}
            req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read().decode()
            events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            usage.append(events[-1]["usage"] if stream else json.loads(text)["usage"])
        db_path = tmp_path / "optd.db"
        deadline = time.monotonic() + 30
        while True:      # rows flushed, and a sample taken after both requests finished (it drained them)
            with sqlite3.connect(db_path) as conn:
                rows = conn.execute("SELECT completion_tokens, prompt_tokens, status, streamed, finished_at"
                                    " FROM requests ORDER BY id").fetchall()
                samples = [(ts, json.loads(d)) for ts, d in conn.execute("SELECT ts, data FROM samples")]
            if len(rows) == 2 and any(ts > max(r[-1] for r in rows) for ts, _ in samples):
                break
            assert time.monotonic() < deadline, f"rows {rows}, {len(samples)} samples"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    assert [r[:-1] for r in rows] == [(u["completion_tokens"], u["prompt_tokens"], "ok", streamed)
                                      for u, streamed in zip(usage, (0, 1), strict=True)]
    assert sum(s["tokens_per_s"] for _, s in samples) > 0
    assert [s["goodput_tokens_per_s"] for _, s in samples] == [0.0] * len(samples)
