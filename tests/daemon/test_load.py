"""`optd load` against a real `optd serve` (demo model), and `optd serve --demo` with its built-in load."""

import importlib.util
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from optd.daemon.cli import main
from optd.daemon.config import load_config
from optd.daemon.load import DEMO_CONFIG, Dist, LoadSpec, plan, read_trace

COUNTERS = ("optd_requests_finished_total", "optd_generation_tokens_total", "optd_prompt_tokens_total",
            "optd_spec_drafts_total")


def start_daemon(state: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`optd serve` on a free port; returns once it has sent READY=1 (as test_serve.py does)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(state / "notify.sock"))
    notify.settimeout(120)
    command = [sys.executable, "-m", "optd.daemon.cli", "serve", "--state-dir", str(state), "--port", "0",
               *flags]
    env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(state / "notify.sock")}
    with open(state / "stderr.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        while "READY=1" not in (message := notify.recv(4096).decode()):
            pass
    finally:
        notify.close()
    port = int(message.rsplit(":", 1)[1].split()[0])
    return proc, f"http://127.0.0.1:{port}"


def stop_daemon(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, base = start_daemon(tmp_path_factory.mktemp("load-server"))
    yield base
    assert stop_daemon(proc) == 0


def counters(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in COUNTERS}


def optd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optd.daemon.cli", *args], capture_output=True, text=True,
                          timeout=180)


def test_the_report_agrees_with_what_the_server_counted(server):
    before = counters(server)
    run = optd("load", "--url", server, "--num-requests", "6", "--rate", "inf", "--concurrency", "3",
               "--prompt-len", "uniform:8-24", "--output-len", "uniform:4-10", "--seed", "7", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    after = counters(server)
    moved = {name: after[name] - before[name] for name in COUNTERS}
    assert (report["requests"], report["ok"], report["failed"], report["failures"]) == (6, 6, 0, {})
    assert moved["optd_requests_finished_total"] == 6
    assert report["output_tokens"] == moved["optd_generation_tokens_total"]
    assert report["prompt_tokens"] == moved["optd_prompt_tokens_total"]
    assert 6 <= report["output_tokens"] <= 60                  # 1..10 tokens each (the model may stop early)
    assert 6 * 4 <= report["prompt_tokens"] <= 6 * 40          # about 8..24 demo tokens each
    # Timed per token: every request has a TTFT and one inter-token gap fewer than its tokens.
    assert report["ttft_s"]["count"] == report["e2e_s"]["count"] == 6
    assert report["itl_s"]["count"] == report["output_tokens"] - 6
    assert report["ttft_s"]["p50"] <= report["ttft_s"]["p95"] <= report["ttft_s"]["p99"]
    assert report["model"] == "demo" and report["slo_ttft_s"] == 0.8 and report["slo_itl_s"] == 0.06
    assert 0 <= report["goodput_requests"] <= 6
    assert report["goodput_share"] == pytest.approx(report["goodput_requests"] / 6)


def test_a_trace_is_replayed_failures_are_counted_by_status_and_the_table_is_readable(server, tmp_path,
                                                                                      capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"prompt": "def fib(n):", "max_tokens": 3}\n\n'
                     '{"prompt_tokens": 12, "max_tokens": 2, "delay_s": 0.01}\n'
                     '{"prompt_tokens": 3000, "max_tokens": 2}\n'   # beyond the demo's 1024: a 400
                     '{"prompt": "import os", "delay_s": 0}\n')
    before = counters(server)
    # An impossible SLO: no request can meet it, so goodput must be zero.
    code = main(["load", "--url", server, "--trace", str(trace), "--output-len", "4", "--slo-ttft", "1ms",
                 "--slo-itl", "0.000001"])
    table = capsys.readouterr().out
    assert code == 0
    assert counters(server)["optd_requests_finished_total"] - before["optd_requests_finished_total"] == 3
    assert "4 requests in" in table and "ok 3   failed 1 (400: 1)" in table
    assert all(word in table for word in ("TTFT", "ITL", "E2E", "p95", "tokens/s"))
    assert "0/4 requests (0%) within TTFT <= 1 ms" in table

    # Nothing succeeds: the report still comes, with exit code 1.
    trace.write_text('{"prompt_tokens": 3000}\n{"prompt_tokens": 2000}\n')
    code = main(["load", "--url", server, "--trace", str(trace), "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 1 and "no request succeeded (2 failed)" in err
    assert (report["ok"], report["failed"], report["failures"]) == (0, 2, {"400": 2})
    assert report["goodput_share"] == 0 and report["output_tokens"] == 0 and report["failure_examples"]["400"]


def test_distributions_and_the_plan_are_reproducible_and_within_bounds():
    rng = random.Random(3)
    uniform = [Dist.model_validate("uniform:3-9").sample(rng) for _ in range(2000)]
    assert min(uniform) == 3 and max(uniform) == 9
    normal = [Dist.model_validate("normal:4,10").sample(rng) for _ in range(2000)]
    assert min(normal) == 1 and max(normal) > 20            # clamped at 1, not cut above
    assert {Dist.model_validate("fixed:7").sample(rng), Dist.model_validate(5).sample(rng)} == {7, 5}
    for bad in ("uniform:9-3", "fixed:0", "normal:5", "zipf:2", "uniform:0-4"):
        with pytest.raises(ValueError):
            Dist.model_validate(bad)

    spec = LoadSpec(rate=4.0, num_requests=400, prompt_len="uniform:10-20", output_len="normal:30,5", seed=11)
    first, again = list(plan(spec)), list(plan(spec))
    assert first == again and len(first) == 400
    assert 29 < sum(p.max_tokens for p in first) / 400 < 31 and len({p.seed for p in first}) > 390
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(first)]
    assert min(gaps) >= 0 and 0.2 < sum(gaps) / len(gaps) < 0.3   # Poisson at 4/s: mean gap 0.25 s
    other = list(plan(spec.model_copy(update={"seed": 12})))
    assert [p.prompt for p in other] != [p.prompt for p in first]
    # Prompts are demo-tokenizer windows of about the drawn length, made of source text.
    engine_dir = Path(next(iter(importlib.util.find_spec("optd.engine").submodule_search_locations)))
    tokenizer = Tokenizer.from_file(str(engine_dir / "demo" / "target" / "tokenizer.json"))
    lengths = [len(tokenizer.encode(p.prompt).ids) for p in first[:50]]
    assert all(8 <= n <= 22 for n in lengths), lengths
    assert sum("def " in p.prompt or "return" in p.prompt or "import" in p.prompt for p in first) > 50

    timed = list(plan(LoadSpec(rate=float("inf"), num_requests=50, duration=1.0, prompt_len="4",
                               output_len="2", seed=1)))
    assert len(timed) == 50 and {p.at_s for p in timed} == {0.0}   # inf: all at once, capped by count
    short = list(plan(LoadSpec(rate=20.0, duration=1.0, prompt_len="4", output_len="2", seed=1)))
    assert short and all(p.at_s < 1.0 for p in short)


def test_a_malformed_trace_line_is_rejected_naming_file_line_and_field(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    cases = {
        '{"prompt": "x", "max_tokens": 0}': f"{trace}:3: max_tokens: Input should be greater than or equal",
        '{"prompt": "x", "tokens": 5}': f"{trace}:3: tokens: unknown field",
        '{"prompt": "x", "prompt_tokens": 5}': f"{trace}:3: give prompt or prompt_tokens, not both",
        '{"prompt": "x", "delay_s": -1}': f"{trace}:3: delay_s:",
        '{"prompt": "x",': f"{trace}:3: not JSON",
        "[1, 2]": f"{trace}:3: expected a JSON object",
    }
    for line, message in cases.items():
        trace.write_text('{"prompt": "ok", "max_tokens": 2}\n\n' + line + "\n")
        with pytest.raises(ValueError, match="^" + message.replace("[", r"\[")):
            read_trace(trace)
    # Through the CLI: exit 2 before anything is sent (the URL is never reached).
    code = main(["load", "--trace", str(trace), "--url", "http://127.0.0.1:9"])
    assert code == 2 and f"{trace}:3: expected a JSON object" in capsys.readouterr().err


def test_bad_options_exit_2_naming_the_option(capsys):
    for args, option in ((["--concurrency", "0"], "--concurrency"), (["--rate", "-1"], "--rate"),
                         (["--prompt-len", "uniform:9-3"], "--prompt-len"),
                         (["--output-len", "lots"], "--output-len"), (["--duration", "soon"], "--duration"),
                         (["--num-requests", "3", "--duration", "5s"], "--duration"),
                         (["--slo-ttft", "0"], "--slo-ttft")):
        try:
            code = main(["load", "--url", "http://127.0.0.1:9", *args])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and option in err, (args, err)


def test_an_unreachable_server_exits_1(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["load", "--url", f"http://127.0.0.1:{port}", "--num-requests", "1"])
    assert code == 1 and f"cannot reach the server at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_demo_settings_are_defaults_that_config_and_flags_override(tmp_path, monkeypatch):
    none = tmp_path / "absent.yaml"
    demo = load_config(None, {"engine": {"model": None}}, default_path=none, defaults=DEMO_CONFIG)
    assert (demo.engine.model, demo.engine.draft_model, demo.knobs.spec_length) == ("demo", "demo-draft", 4)
    monkeypatch.setenv("OPTD_KNOBS__SPEC_LENGTH", "2")
    config = tmp_path / "optd.yaml"
    config.write_text("engine:\n  draft_model: ngram\n")
    mixed = load_config(config, {"engine": {"device": "cpu"}}, defaults=DEMO_CONFIG)
    assert (mixed.engine.model, mixed.engine.draft_model, mixed.knobs.spec_length) == ("demo", "ngram", 2)


def test_serve_demo_runs_its_own_load_and_stops_cleanly_on_sigterm(tmp_path):
    proc, base = start_daemon(tmp_path, "--demo")
    try:
        with urllib.request.urlopen(base + "/v1/control/status", timeout=30) as r:
            assert json.loads(r.read())["knobs"]["spec_length"] == 4   # the balanced start: speculation on
        deadline = time.monotonic() + 90
        while counters(base)["optd_requests_finished_total"] < 1:
            assert time.monotonic() < deadline, "the demo load finished no request"
            time.sleep(0.5)
        assert counters(base)["optd_spec_drafts_total"] > 0          # the demo draft model is at work
    finally:
        code = stop_daemon(proc)
    assert code == 0
    log = (tmp_path / "stderr.log").read_text()
    assert "demo load: 0.5 requests/s" in log and "demo load stopped" not in log
