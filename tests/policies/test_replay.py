"""`optd policy replay`: a policy evaluated over samples recorded in a real store, without an engine."""

import json

import pytest

from optd.daemon import db, policy_replay
from optd.daemon.cli import main
from optd.daemon.store import Store
from optd.policies.loader import load_policy
from optd.policies.replay import BoundedWindow, knobs_of, replay
from optd.policies.window import SampleSeries

T0 = 1_800_000_000.0
BREACH_AT = 120     # seconds after T0: ITL p95 goes from 20 ms to 200 ms (the balanced SLO is 60 ms)


def sample(t: int) -> dict:
    """One recorded second of a daemon at batch 16 and spec_length 2: requests wait in the first minute
    (the SLOs hold), the ITL SLO breaks from BREACH_AT on."""
    return {
        "ts": T0 + t, "tokens_per_s": 400.0, "goodput_tokens_per_s": 380.0, "requests_per_s": 4.0,
        "ttft_p50": 0.05, "ttft_p95": 0.1, "ttft_p99": 0.2, "itl_p50": 0.01,
        "itl_p95": 0.02 if t < BREACH_AT else 0.2, "itl_p99": 0.3, "e2e_p95": 2.0,
        "requests_running": 16.0, "requests_waiting": 3.0 if t < 60 else 0.0, "preemptions_per_s": 0.0,
        "kv_usage": 0.5, "acceptance_rate": 0.6, "acceptance_length": 2.2, "quality_top1": 1.0,
        "quality_kl": 0.0, "gpu_memory_used_ratio": None, "gpu_util": None, "gpu_power_w": None,
        "spec_length": 2.0, "kv_compression": 0.0, "weight_bits": 16.0, "max_batch_size": 16.0,
        "spec_accept_pos1": 0.7, "spec_accept_pos2": 0.45, "spec_accept_pos3": None,
        "step_time_k0": 0.02, "step_time_k2": 0.05,   # k = 0 gives the most tokens/s
    }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A migrated SQLite database holding 240 samples, and a config with the engine envelope."""
    root = tmp_path_factory.mktemp("replay")
    url = f"sqlite:///{root / 'optd.db'}"
    db.upgrade(url)
    with Store(url) as store:
        for t in range(240):
            store.add_sample(sample(t))
    config = root / "optd.yaml"
    config.write_text("engine: {draft_model: demo-draft, max_num_seqs: 32}\n")
    return url, str(config)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["policy", "replay", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_replay_of_a_recorded_database_gives_the_same_decisions_twice(recorded, capsys):
    url, config = recorded
    args = ("balanced", "--db", url, "--config", config, "--json")
    code, first, _ = run(capsys, *args)
    assert code == 0
    code, second, _ = run(capsys, *args)
    assert code == 0 and first == second
    decisions = json.loads(first)
    assert decisions and [d["ts"] for d in decisions] == sorted(d["ts"] for d in decisions)

    batch = [d for d in decisions if d["knob"] == "max_batch_size"]
    ups = [d for d in batch if d["new"] > d["old"]]
    downs = [d for d in batch if d["new"] < d["old"]]
    # Requests waited while the SLOs held: up by behavior.up.max_step (2), only in that first minute
    # plus the 30 s up-window; the breach: halved at once (aimd's urgent decrease ignores max_step).
    assert ups and all(d["new"] == 18 and d["ts"] < T0 + 60 + 30 for d in ups)
    assert downs and all(d["new"] == 8 and d["ts"] >= T0 + BREACH_AT for d in downs)
    assert all(d["source"] == "policy:balanced/aimd" and d["outcome"] == "applied" for d in batch)
    assert "> SLO 60ms" in downs[0]["reason"] and downs[0]["inputs"]["itl_p95"] > 0.06
    spec = [d for d in decisions if d["knob"] == "spec_length"]
    # k = 0 gives the most tokens/s with these step times; down by behavior.down.max_step (1).
    assert spec and all(d["new"] == 1 and d["source"] == "policy:balanced/goodput" for d in spec)
    assert spec[0]["inputs"]["spec_accept_pos1"] == 0.7

    code, text, _ = run(capsys, "balanced", "--db", url, "--config", config)
    lines = text.splitlines()
    assert code == 0 and len(lines) == len(decisions)
    assert "max_batch_size 16 -> 8 [applied] policy:balanced/aimd: ITL p95" in text


def test_since_limits_the_samples_and_bad_input_exits_2(recorded, capsys):
    url, config = recorded
    common = ("balanced", "--db", url, "--config", config, "--json")
    code, out, _ = run(capsys, *common, "--since", str(T0 + 150))
    later = json.loads(out)
    assert code == 0 and later and all(d["ts"] >= T0 + 150 for d in later)
    code, iso, _ = run(capsys, *common, "--since", "2027-01-15T08:02:30+00:00")     # = T0 + 150
    assert code == 0 and iso == out

    code, _, err = run(capsys, "balanced", "--db", url, "--config", config, "--since", "yesterday")
    assert code == 2 and "--since: 'yesterday' is neither" in err
    code, _, err = run(capsys, "no-such-policy", "--db", url, "--config", config)
    assert code == 2 and "no policy named 'no-such-policy'" in err


def test_samples_are_read_page_by_page_in_order_once_each(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'optd.db'}"
    db.upgrade(url)
    # Runs of equal timestamps across page boundaries, and a run longer than a page.
    stamps = [1.0] * 3 + [2.0] * 9 + [3.0, 4.0, 4.0, 5.0] + [6.0] * 5
    with Store(url) as store:
        for i, ts in enumerate(stamps):
            store.add_sample({"ts": T0 + ts, "i": i})
        store.flush()
        monkeypatch.setattr(policy_replay, "PAGE", 4)
        assert [s["i"] for s in policy_replay.read_samples(store, 0.0)] == list(range(len(stamps)))
        assert [s["i"] for s in policy_replay.read_samples(store, T0 + 4.0)] == list(range(13, len(stamps)))


def test_the_bounded_window_is_the_ring_buffer_s_view():
    samples = [{"ts": T0 + t, "x": float(t), "y": None if t % 3 else float(t)} for t in range(100)]
    window, series = BoundedWindow(seconds=20), SampleSeries(samples)
    for s in samples:
        window.append(s)
    now = T0 + 99
    assert window.window("x", 10, now) == series.window("x", 10, now) == [float(t) for t in range(90, 100)]
    assert window.window("x", 1000, now) == [float(t) for t in range(80, 100)]     # only the last 20 s
    assert window.window("y", 20, now) == series.window("y", 20, now)
    assert window.last("y") == 99.0 and len(window) == 20
    with pytest.raises(ValueError, match="older than the newest"):
        window.append({"ts": T0})


def test_knobs_come_from_the_samples_and_replay_is_a_pure_function():
    knobs = knobs_of({"spec_length": 3.0, "max_batch_size": 12.0, "weight_bits": None}, knobs_of({}, _k()))
    assert (knobs.spec_length, knobs.max_batch_size, knobs.weight_bits) == (3, 12, 16.0)
    assert isinstance(knobs.spec_length, int)
    loaded = load_policy("balanced")
    samples = [sample(t) for t in range(0, 240)]
    bounds = {"max_batch_size": (1, 32), "spec_length": (0, 8)}
    first = list(replay(loaded, samples, knob_bounds=bounds))
    assert first == list(replay(loaded, samples, knob_bounds=bounds)) and first
    # Ticks every spec.evaluate_every (5 s) of sample time: at most one decision per knob per tick.
    ticks = {(d.ts - T0) for d in first}
    assert all(t % 5 == 0 for t in ticks)
    assert len(first) == len({(d.ts, d.knob) for d in first})


def _k():
    from optd.engine.knobs import Knobs

    return Knobs()
