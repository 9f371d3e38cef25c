"""The policy engine in closed loop: a real `optd serve` (demo model, CPU) with a policy whose ITL SLO
(1 ms) no batch size can meet, driven by concurrent completions.

One daemon is shared by the module; the tests run in file order and each leaves it in a state the next
expects (the policy, the pins). Waits poll for what the test asserts, never for a time.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from optd.daemon import quality_probe
from optd.engine import EngineError
from optd.engine.knobs import Knobs
from optd.engine.quality import QualityReport
from tests.daemon.test_serve_lifecycle import Daemon, kill, reload, start, status_line, wait_for

KNOB = "max_batch_size"
ENVELOPE = 8
POLICY = """\
apiVersion: optd/v1
kind: Policy
metadata: {{name: {name}}}
spec:
  mode: {mode}
  evaluate_every: 1s
  slo: {{itl_p95: 1ms}}            # nothing on a CPU meets this: aimd must keep lowering the batch
  knobs:
    max_batch_size: {{min: 1, max: 8, controller: aimd}}
  behavior:
    up:   {{stabilization_window: 1s}}
    down: {{stabilization_window: 1s}}
  quality_probe_every: 1h
"""
CONFIG = f"""\
engine: {{max_num_seqs: {ENVELOPE}}}
telemetry: {{interval_s: 0.5}}
store: {{flush_interval_s: 0.5}}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("policy-daemon")
    (root / "optd.yaml").write_text(CONFIG)
    (root / "breaker.yaml").write_text(POLICY.format(name="slo-breaker", mode="enforce"))
    d = start(root / "state", "--config", str(root / "optd.yaml"), "--policy", str(root / "breaker.yaml"))
    d.policy_file = root / "breaker.yaml"
    yield d
    try:
        assert d.stop() == 0
    finally:
        kill(d)


@contextmanager
def load(daemon: Daemon, workers: int = 6) -> Iterator[None]:
    """Completions from `workers` threads, back to back, until the block ends."""
    stop = threading.Event()
    body = json.dumps({"model": "demo", "prompt": "def parse(text):", "max_tokens": 24}).encode()

    def work() -> None:
        while not stop.is_set():
            req = urllib.request.Request(daemon.base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=60).read()
            except (urllib.error.URLError, TimeoutError):
                time.sleep(0.1)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def decisions(daemon: Daemon, since: float = 0.0, **query: str) -> list[dict]:
    q = "&".join(f"{k}={v}" for k, v in {"limit": "1000", **query}.items())
    return [d for d in daemon.get(f"/v1/control/decisions?{q}")["decisions"] if d["ts"] >= since]


def policy_decisions(daemon: Daemon, since: float = 0.0, **query: str) -> list[dict]:
    return [d for d in decisions(daemon, since, **query) if (d["source"] or "").startswith("policy:")]


def knob(daemon: Daemon) -> int:
    return daemon.get("/v1/control/status")["knobs"][KNOB]


def refusal(daemon: Daemon, body: dict, token: bool = True) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as err:
        daemon.send("PUT", "/v1/control/policy", body, token=token)
    return err.value.code, json.loads(err.value.read())["error"]["message"]


def test_aimd_lowers_the_batch_size_the_slo_rules_out_and_records_why(daemon):
    status = daemon.get("/v1/control/status")
    assert (status["policy"], status["mode"], status["knobs"][KNOB]) == ("slo-breaker", "enforce", ENVELOPE)
    events = urllib.request.urlopen(daemon.base + "/v1/control/events?kinds=decision", timeout=60)
    assert [events.readline(), events.readline()] == [b": connected\n", b"\n"]

    with load(daemon):
        wait_for(lambda: knob(daemon) < ENVELOPE, "aimd to lower max_batch_size", timeout=120)

    applied = policy_decisions(daemon, knob=KNOB, outcome="applied")
    first = applied[-1]                                     # newest first
    assert (first["old_value"], first["source"], first["policy"], first["mode"]) == (
        ENVELOPE, "policy:slo-breaker/aimd", "slo-breaker", "enforce")
    assert 1 <= first["new_value"] < ENVELOPE and isinstance(first["new_value"], int)
    assert first["inputs"]["itl_p95"] > first["inputs"]["slo.itl_p95"] == 0.001
    assert "ITL p95" in first["reason"] and "SLO 1ms" in first["reason"]
    assert all(1 <= d["new_value"] < d["old_value"] for d in applied)    # only ever down, within bounds

    # The same decision is in the store, with its inputs and reason, and went out on the event stream.
    with sqlite3.connect(daemon.state / "optd.db") as conn:
        row = conn.execute("SELECT old_value, new_value, outcome, reason, inputs, source FROM decisions "
                           "WHERE ts = ? AND knob = ?", (first["ts"], KNOB)).fetchone()
    assert row[:4] == (ENVELOPE, first["new_value"], "applied", first["reason"])
    assert json.loads(row[4])["itl_p95"] == first["inputs"]["itl_p95"] and row[5] == "policy:slo-breaker/aimd"
    lines = []
    while not lines or lines[-1] != b"\n":
        lines.append(events.readline())
    assert lines[0] == b"event: decision\n"
    event = json.loads(lines[1].removeprefix(b"data: "))
    assert (event["knob"], event["old_value"], event["source"]) == (KNOB, ENVELOPE, "policy:slo-breaker/aimd")
    events.close()

    with urllib.request.urlopen(daemon.base + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert f'optd_decisions_total{{knob="{KNOB}",outcome="applied"}} {len(applied)}.0' in metrics

    # Samples carry the probe's quality (run at start, reference cached in the state directory) and
    # the goodput controller's step times.
    samples = daemon.get("/v1/control/telemetry?seconds=300")["samples"]
    assert any(s["quality_top1"] == 1.0 and s["quality_kl"] is not None for s in samples)
    assert any(s.get("step_time_k0") for s in samples)
    assert any((daemon.state / "quality").iterdir())


def test_a_pinned_knob_is_left_alone(daemon):
    daemon.send("PUT", f"/v1/control/knobs/{KNOB}", {"value": 6, "reason": "hands off"})
    since = time.time()
    with load(daemon):
        pinned = wait_for(lambda: policy_decisions(daemon, since, knob=KNOB, outcome="pinned"),
                          "a decision the pin held back", timeout=120)
    assert knob(daemon) == 6
    assert pinned[0]["new_value"] < 6 and pinned[0]["reason"]
    assert not policy_decisions(daemon, since, knob=KNOB, outcome="applied")
    daemon.send("DELETE", f"/v1/control/knobs/{KNOB}")
    assert knob(daemon) == ENVELOPE                 # back to the start value (no configured one)


def test_observe_mode_records_decisions_and_applies_nothing(daemon):
    view = daemon.send("PUT", "/v1/control/policy",
                       {"yaml": POLICY.format(name="slo-observer", mode="observe")})
    assert (view["name"], view["mode"], view["origin"]) == ("slo-observer", "observe", "api")
    status = daemon.get("/v1/control/status")
    assert (status["policy"], status["mode"]) == ("slo-observer", "observe")
    since = time.time()
    with load(daemon):
        observed = wait_for(lambda: policy_decisions(daemon, since, knob=KNOB, outcome="observe"),
                            "an observe-only decision", timeout=120)
    assert knob(daemon) == ENVELOPE
    assert observed[0]["mode"] == "observe" and observed[0]["policy"] == "slo-observer"
    assert observed[0]["new_value"] < ENVELOPE
    assert not policy_decisions(daemon, since, knob=KNOB, outcome="applied")


def test_an_invalid_policy_or_a_path_is_refused_and_the_running_policy_stays(daemon):
    before = daemon.get("/v1/control/policy")
    assert before["name"] == "slo-observer" and before["version_id"] is not None

    bad = (POLICY.format(name="broken", mode="enforce")
           + "  rules:\n    - {name: r, when: 'last(nope) > 1', then: {set: {max_batch_size: 2}}}\n")
    code, message = refusal(daemon, {"yaml": bad})
    assert code == 400 and "spec.rules[0].when" in message and "nope" in message
    code, message = refusal(daemon, {"yaml": "apiVersion: optd/v1\nkind: Policy\nmetadata: {name: x}\n"
                                             f"include: [{daemon.policy_file}]\nspec: {{}}\n"})
    assert code == 400 and "include[0]" in message and "never file paths" in message
    other = str(daemon.policy_file.with_name("other.yaml"))
    for path in ("/etc/passwd", other, "../breaker", "breaker.yaml"):
        code, message = refusal(daemon, {"name": path})
        assert code == 400 and "not a policy name" in message
    code, message = refusal(daemon, {"name": "no-such-policy"})
    assert code == 400 and "no policy named 'no-such-policy'" in message
    assert refusal(daemon, {"name": "balanced"}, token=False)[0] == 401
    assert refusal(daemon, {"name": "balanced", "yaml": bad})[0] == 400

    after = daemon.get("/v1/control/policy")
    assert (after["name"], after["version_id"], after["yaml"]) == (
        before["name"], before["version_id"], before["yaml"])
    with sqlite3.connect(daemon.state / "optd.db") as conn:
        active = conn.execute("SELECT id, name FROM policy_versions WHERE active").fetchall()
        names = [n for (n,) in conn.execute("SELECT name FROM policy_versions ORDER BY id")]
    assert active == [(before["version_id"], "slo-observer")] and names == ["slo-breaker", "slo-observer"]

    # The configured policy may be named, by its reference or its own name: it came from the config.
    for name in (str(daemon.policy_file), "slo-breaker"):
        assert daemon.send("PUT", "/v1/control/policy", {"name": name})["name"] == "slo-breaker"
    daemon.send("PUT", "/v1/control/policy", {"yaml": POLICY.format(name="slo-observer", mode="observe")})


def test_sighup_rereads_the_policy_and_keeps_the_running_one_when_it_is_invalid(daemon):
    good = daemon.policy_file.read_text()
    daemon.policy_file.write_text(good.replace("evaluate_every: 1s", "evaluate_every: soon"))
    _, ready = reload(daemon)
    status = status_line(ready)
    assert "refused policy" in status and "spec.evaluate_every" in status
    assert "running policy slo-observer kept" in status
    assert daemon.get("/v1/control/status")["policy"] == "slo-observer"

    # The file is fine again and its policy unchanged since start: the policy switched over the API stays.
    daemon.policy_file.write_text(good)
    _, ready = reload(daemon)
    assert "refused" not in status_line(ready)
    assert daemon.get("/v1/control/status")["policy"] == "slo-observer"

    # The file changed: its policy takes over.
    daemon.policy_file.write_text(good.replace("slo-breaker", "slo-breaker-2"))
    _, ready = reload(daemon)
    assert "policy=slo-breaker-2" in status_line(ready)
    assert daemon.get("/v1/control/policy")["origin"] == "reload"


# ---------------------------------------------------------------------------------------------------
# The quality probe's schedule, against an engine stand-in whose knobs the test turns and whose probe
# answers at once (a real probe's result depends on the model; the schedule is what is tested here).


class ProbedEngine:
    def __init__(self) -> None:
        self.knobs = Knobs()
        self.calls = 0
        self.full = 0           # the next `full` probes find the KV cache full

    def is_alive(self) -> bool:
        return True

    def probe(self) -> QualityReport:
        self.calls += 1
        if self.full:
            self.full -= 1
            raise EngineError("quality probe: the KV cache is full right now; try again later")
        top1 = 1.0 if self.knobs.kv_compression == 0 else 0.9
        return QualityReport(top1=top1, kl=1 - top1, positions=10, seconds=0.0)


def test_the_quality_probe_runs_at_start_after_a_quality_knob_moves_and_retries_a_full_cache(monkeypatch):
    monkeypatch.setattr(quality_probe, "RETRY_S", 0.05)
    engine = ProbedEngine()
    probe = quality_probe.QualityProbe(engine, every_s=None)
    probe.set_interval(3600.0)                  # a policy's period, set before the job starts

    async def main() -> None:
        probe.start()
        await until(lambda: probe() == (1.0, 0.0))
        assert engine.calls == 1 and probe.every_s == 3600.0
        engine.knobs = Knobs(kv_compression=0.5)       # whoever moved it: the old figure is stale
        assert probe() is None
        await until(lambda: probe() == (0.9, pytest.approx(0.1)))
        assert engine.calls == 2
        engine.full = 2
        probe.request()                                  # e.g. the policy job after its own change
        await until(lambda: probe.runs == 3)
        assert probe.skipped == 2 and engine.calls == 5
        await probe.stop()

    async def until(condition) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")

    asyncio.run(main())
