"""Two reads of the control API for the dashboard: the knobs' ranges (`GET /v1/control/knobs`, what a pin
may ask of this engine) and the recent failed requests (`GET /v1/control/requests`), through the real
app (create_app: OpenAI routes + control routes) on the demo engine. The dashboard's side is tested in
tests/tui (test_parts: the pin modal's checks against `ranges`; test_live: both against a real daemon).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from optd.daemon import db
from optd.daemon.app import create_app
from optd.daemon.control_api import ControlRoutes
from optd.daemon.events import EventHub
from optd.daemon.metrics import Metrics
from optd.daemon.request_log import FinishedRequest, RecentErrors, RequestLog
from optd.daemon.store import Store
from optd.engine import Engine, EngineConfig
from optd.policies.schema import KNOB_LIMITS

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="demo", max_num_seqs=8, max_model_len=MAX_MODEL_LEN))
    yield eng
    eng.shutdown()


def serve(engine, tmp_path, loopback: bool = True):
    url = f"sqlite:///{tmp_path / 'optd.db'}"
    db.upgrade(url)
    store = Store(url)
    metrics = Metrics(device=str(engine.device))
    control = ControlRoutes(engine, store, TOKEN, EventHub(), {}, metrics=metrics)
    app = create_app(engine, "demo", 16, metrics, control, requests=RequestLog(store=store, metrics=metrics))
    client = TestClient(app, client=("127.0.0.1", 5000) if loopback else ("10.1.2.3", 5000))
    return client, store


def test_knob_ranges_are_the_engines_envelope(engine, tmp_path):
    client, store = serve(engine, tmp_path)
    with client:
        ranges = client.get("/v1/control/knobs").json()["ranges"]
        assert ranges["max_batch_size"] == {"min": 1, "max": 8, "integer": True, "supported": True}
        # no drafter: no speculation, and the engine refuses every spec_length
        assert ranges["spec_length"]["supported"] is False and (ranges["spec_length"]["min"],
                                                                ranges["spec_length"]["max"]) == (0, 0)
        assert "needs a drafter" in ranges["spec_length"]["reason"]
        for knob in ("kv_compression", "weight_bits"):
            r = ranges[knob]
            if r["supported"]:              # the engine does not narrow these: their natural range
                natural = KNOB_LIMITS[knob]
                assert (r["min"], r["max"]) == (natural.lo, natural.hi) and "reason" not in r
            else:                           # only the value it holds
                assert r["min"] == r["max"] == getattr(engine.knobs, knob) and r["reason"]
        # the range is what the engine accepts: its ends are applied, one past the end is refused
        put = "/v1/control/knobs/max_batch_size"
        assert client.put(put, json={"value": 8}, headers=AUTH).status_code == 200
        refused = client.put(put, json={"value": 9}, headers=AUTH)
        assert refused.status_code == 400 and "1..8" in refused.json()["error"]["message"]
        assert client.delete(put, headers=AUTH).status_code == 200
        # `supported: false` is the engine's word: even the value the knob holds is refused, for that reason
        for knob, r in ranges.items():
            if not r["supported"]:
                answer = client.put(f"/v1/control/knobs/{knob}", json={"value": r["min"]}, headers=AUTH)
                assert answer.status_code == 400 and answer.json()["error"]["message"] == r["reason"]
        assert store.pins() == {}
    store.close()


def test_knob_ranges_with_a_drafter(tmp_path):
    eng = Engine(EngineConfig(model="demo", draft_model="ngram", max_num_seqs=4, max_spec_length=3))
    try:
        client, store = serve(eng, tmp_path)
        with client:
            ranges = client.get("/v1/control/knobs").json()["ranges"]
            assert ranges["spec_length"] == {"min": 0, "max": 3, "integer": True, "supported": True}
            assert ranges["max_batch_size"]["max"] == 4
        store.close()
    finally:
        eng.shutdown()


def test_a_rejected_request_shows_in_recent_errors(engine, tmp_path):
    client, store = serve(engine, tmp_path)
    with client:
        before = client.get("/v1/control/requests").json()
        assert before["recent_errors"] == [] and before["waiting"] == 0
        ok = client.post("/v1/completions", json={"model": "demo", "prompt": "def f", "max_tokens": 2})
        assert ok.status_code == 200
        too_long = client.post("/v1/completions", json={"model": "demo", "prompt": [1] * (MAX_MODEL_LEN + 5),
                                                         "max_tokens": 2})
        assert too_long.status_code == 400
        # a client's malformed body is not served traffic: not recorded, not listed
        assert client.post("/v1/completions", json={"model": "demo", "bogus": 1}).status_code == 400
        answer = client.get("/v1/control/requests").json()
        assert [e["status"] for e in answer["recent_errors"]] == ["rejected"]
        error = answer["recent_errors"][0]
        assert error["endpoint"] == "completions" and error["ts"] > 0
        assert f"max_model_len is {MAX_MODEL_LEN}" in error["error"]
        assert error["error"] == too_long.json()["error"]["message"]
        assert answer["error_counts"] == {"error": 0, "rejected": 1, "aborted": 0}
        assert answer["running"] == 0 and answer["waiting"] == 0
        assert client.get("/v1/control/requests?limit=0").json()["error"]["param"] == "limit"
        assert client.get("/v1/control/requests?limit=x").status_code == 400
    store.close()


def test_requests_read_needs_the_token_off_loopback(engine, tmp_path):
    client, store = serve(engine, tmp_path, loopback=False)
    with client:
        assert client.get("/v1/control/requests").status_code == 401
        assert client.get("/v1/control/requests", headers=AUTH).status_code == 200
    store.close()


def _finished(i: int, status: str, error: str | None = None) -> FinishedRequest:
    return FinishedRequest(request_id=f"r{i}", endpoint="chat", streamed=False, status=status,
                           finish_reason=None, arrival=float(i), finished_at=float(i) + 0.5, prompt_tokens=3,
                           completion_tokens=0, ttft_s=None, e2e_s=0.5, error=error)


def test_recent_errors_keep_the_last_n_not_ok_newest_first():
    recent = RecentErrors(capacity=3)
    for i in range(5):
        recent(_finished(i, "aborted" if i % 2 else "error", "x" * 2000 if i == 4 else f"boom {i}"))
    recent(_finished(9, "ok"))
    assert [e["request_id"] for e in recent.latest()] == ["r4", "r3", "r2"]
    assert recent.latest(1)[0]["error"].endswith("…") and len(recent.latest(1)[0]["error"]) == 500
    assert recent.counts() == {"error": 3, "rejected": 0, "aborted": 2}
    with pytest.raises(ValueError, match="capacity"):
        RecentErrors(0)
