"""The control API: auth, pins (apply, reject, TTL, restart), pause/resume, decisions, telemetry, SSE."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from optd.daemon import db
from optd.daemon.control_api import ControlRoutes
from optd.daemon.events import EventHub
from optd.daemon.store import Store
from optd.engine import Engine, EngineConfig
from tests.daemon.ports import free_port

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG_KNOBS = {"max_batch_size": 6}


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="demo", max_num_seqs=8))
    yield eng
    eng.shutdown()


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'optd.db'}"
    db.upgrade(url)
    return url


def build(engine, url, ring=None):
    engine.apply(**CONFIG_KNOBS)            # what `serve` does with the config's knobs
    store = Store(url)
    hub = EventHub(maxsize=8)
    routes = ControlRoutes(engine, store, TOKEN, hub, CONFIG_KNOBS, ring=ring)
    app = FastAPI()
    app.include_router(routes.router)
    return app, routes, store, hub


@pytest.fixture
def ctl(engine, url):
    app, routes, store, _ = build(engine, url)
    with TestClient(app) as client:          # client host "testclient": not loopback
        yield client, routes, store, engine
    store.close()


def test_writes_need_the_token(ctl):
    client, _, store, engine = ctl
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = client.put("/v1/control/knobs/max_batch_size", json={"value": 2}, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"]["message"]
        assert client.delete("/v1/control/knobs/max_batch_size", headers=headers).status_code == 401
        assert client.post("/v1/control/pause", headers=headers).status_code == 401
    assert engine.knobs.max_batch_size == 6 and store.pins() == {}
    assert store.get_state("paused") is None and store.decisions() == []


def test_reads_open_on_loopback_only(ctl, engine, url):
    client = ctl[0]
    assert client.get("/v1/control/status").status_code == 401
    assert client.get("/v1/control/status", headers=AUTH).status_code == 200
    app = build(engine, url)[0]
    with TestClient(app, client=("127.0.0.1", 5000)) as local:
        r = local.get("/v1/control/status")
        assert r.status_code == 200
        assert local.post("/v1/control/pause").status_code == 401     # writes need it even there


def test_pin_shows_in_status_and_engine(ctl):
    client, _, store, engine = ctl
    r = client.put("/v1/control/knobs/max_batch_size", json={"value": 3, "reason": "load test"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert engine.knobs.max_batch_size == 3
    status = client.get("/v1/control/status", headers=AUTH).json()
    assert status["knobs"]["max_batch_size"] == 3
    pin = status["pins"]["max_batch_size"]
    assert pin["value"] == 3 and pin["reason"] == "load test" and pin["source"] == "api"
    assert pin["expires_at"] is None
    assert status["paused"] is False and status["policy"] is None and status["mode"] is None
    assert {"running", "waiting", "kv_usage"} <= status["engine"].keys()
    knobs = client.get("/v1/control/knobs", headers=AUTH).json()
    assert knobs["knobs"]["max_batch_size"] == 3 and knobs["pins"]["max_batch_size"]["value"] == 3

    decisions = client.get("/v1/control/decisions", params={"knob": "max_batch_size"}, headers=AUTH).json()
    d = decisions["decisions"][0]
    assert (d["old_value"], d["new_value"], d["outcome"]) == (6, 3, "applied")
    assert d["reason"] == "pinned by operator: load test"

    # Unpin: back to the configured value.
    r = client.delete("/v1/control/knobs/max_batch_size", headers=AUTH)
    assert r.status_code == 200 and r.json()["value"] == 6
    assert engine.knobs.max_batch_size == 6 and store.pins() == {}
    assert client.delete("/v1/control/knobs/max_batch_size", headers=AUTH).status_code == 404


@pytest.mark.parametrize("value, why", [(0, "1..8"), ("x", "integer"), (9, "1..8"), (None, "integer")])
def test_invalid_pin_changes_nothing(ctl, value, why):
    client, _, store, engine = ctl
    r = client.put("/v1/control/knobs/max_batch_size", json={"value": value}, headers=AUTH)
    assert r.status_code == 400 and why in r.json()["error"]["message"]
    assert engine.knobs.max_batch_size == 6 and store.pins() == {} and store.decisions() == []


def test_bad_requests(ctl):
    client, _, store, engine = ctl
    put = client.put
    path = "/v1/control/knobs/max_batch_size"
    assert put("/v1/control/knobs/nope", json={"value": 1}, headers=AUTH).status_code == 404
    assert put("/v1/control/knobs/max_batch_size", json={}, headers=AUTH).status_code == 400
    assert put(path, json={"value": 2, "ttl_s": 0}, headers=AUTH).status_code == 400
    assert put(path, json={"value": 2, "x": 1}, headers=AUTH).status_code == 400
    assert put(path, content=b"{", headers=AUTH).status_code == 400
    assert client.get("/v1/control/decisions", params={"outcome": "maybe"}, headers=AUTH).status_code == 400
    assert client.get("/v1/control/telemetry", params={"seconds": "-1"}, headers=AUTH).status_code == 400
    assert engine.knobs.max_batch_size == 6 and store.pins() == {}


def test_pin_with_ttl_expires(ctl):
    client, routes, store, engine = ctl
    r = client.put("/v1/control/knobs/max_batch_size", json={"value": 2, "ttl_s": 30}, headers=AUTH)
    assert r.status_code == 200
    expires_at = r.json()["pin"]["expires_at"]
    assert expires_at == pytest.approx(time.time() + 30, abs=5)
    assert routes.expire_pins() == [] and engine.knobs.max_batch_size == 2
    assert routes.expire_pins(now=expires_at + 1) == ["max_batch_size"]
    assert engine.knobs.max_batch_size == 6 and store.pins() == {}
    assert "expired" in store.decisions(knob="max_batch_size")[0]["reason"]


def test_pins_survive_a_restart(engine, url):
    app, _, store, _ = build(engine, url)
    with TestClient(app) as client:
        r = client.put("/v1/control/knobs/max_batch_size", json={"value": 4}, headers=AUTH)
        assert r.status_code == 200
        assert client.post("/v1/control/pause", headers=AUTH).json() == {"paused": True}
    store.close()

    fresh = Engine(EngineConfig(model="demo", max_num_seqs=8))
    try:
        app, routes, store, _ = build(fresh, url)
        assert fresh.knobs.max_batch_size == 6
        assert set(routes.restore_pins()) == {"max_batch_size"}
        assert fresh.knobs.max_batch_size == 4
        with TestClient(app) as client:
            status = client.get("/v1/control/status", headers=AUTH).json()
            assert status["pins"]["max_batch_size"]["value"] == 4 and status["paused"] is True
            assert client.post("/v1/control/resume", headers=AUTH).json() == {"paused": False}
            assert client.get("/v1/control/status", headers=AUTH).json()["paused"] is False
            # unpinning after the restart still goes back to the configured value
            assert client.delete("/v1/control/knobs/max_batch_size", headers=AUTH).json()["value"] == 6
        store.close()
    finally:
        fresh.shutdown()


def test_telemetry_from_ring_and_store(engine, url):
    class Ring:
        def samples(self):
            return [{"ts": time.time() - 500, "tokens_per_s": 1.0}, {"ts": time.time(), "tokens_per_s": 2.0}]

    app, _, store, _ = build(engine, url, ring=Ring())
    with TestClient(app) as client:
        got = client.get("/v1/control/telemetry", params={"seconds": 60}, headers=AUTH).json()["samples"]
        assert [s["tokens_per_s"] for s in got] == [2.0]
    store.add_sample({"tokens_per_s": 5.0, "quality_kl": float("nan")})
    store.flush()
    app = build(engine, url)[0]
    with TestClient(app) as client:
        got = client.get("/v1/control/telemetry", headers=AUTH).json()["samples"]
        assert got[-1]["tokens_per_s"] == 5.0 and got[-1]["quality_kl"] is None
    store.close()


def test_events_stream_over_sse(engine, url):
    app, _, store, hub = build(engine, url)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}/v1/control"
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        events: list[tuple[str, dict]] = []

        def read() -> None:   # loopback: no token needed to read
            with httpx.stream("GET", f"{base}/events", timeout=10) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                kind = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        events.append((kind, json.loads(line[6:])))
                        if len(events) == 2:
                            return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while hub.subscribers == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.post(f"{base}/pause", headers=AUTH).status_code == 200
        r = httpx.put(f"{base}/knobs/max_batch_size", json={"value": 5, "ttl_s": 60}, headers=AUTH)
        assert r.status_code == 200
        reader.join(timeout=10)
        assert not reader.is_alive(), "no events within 10 s"
        assert events[0] == ("pause", {"ts": pytest.approx(time.time(), abs=30), "paused": True})
        kind, data = events[1]
        assert kind == "override" and data["knob"] == "max_batch_size" and data["new_value"] == 5
        assert data["outcome"] == "applied" and data["inputs"]["expires_at"] is not None
        assert httpx.get(f"{base}/decisions").status_code == 200
    finally:
        hub.close()
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


def test_hub_drops_oldest_for_slow_subscriber_and_crosses_threads():
    async def main():
        hub = EventHub(maxsize=3)
        async with hub.subscribe() as sub:
            for i in range(5):
                hub.publish("n", {"i": i})
            assert sub.dropped == 2
            assert [(await sub.get())[1]["i"] for _ in range(3)] == [2, 3, 4]
            assert await sub.get(timeout=0.05) is None
            loop = asyncio.get_running_loop()
            threading.Thread(target=hub.publish, args=("t", {"from": "thread"})).start()
            assert await sub.get(timeout=5) == ("t", {"from": "thread"})
            threading.Thread(target=hub.publish_threadsafe, args=(loop, "u", {})).start()
            assert await sub.get(timeout=5) == ("u", {})
        assert hub.subscribers == 0
        hub.publish("n", {})          # nobody listening: fine

    asyncio.run(main())
