"""The OpenAI-compatible API through the official `openai` client, against a real server on a free port."""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from optd.daemon import db
from optd.daemon.app import create_app
from optd.daemon.metrics import Metrics
from optd.daemon.request_log import FinishedBuffer, FinishedRequest, RequestLog
from optd.daemon.store import Store
from optd.daemon.telemetry import SLO, Sampler
from optd.engine import Engine, EngineConfig, SamplingParams
from tests.daemon.ports import free_port


class Server(NamedTuple):
    url: str
    engine: Engine
    store: Store
    log: RequestLog
    records: list[FinishedRequest]      # every request the server recorded, in order


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = Engine(EngineConfig(model="demo", max_num_seqs=16))
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'optd.db'}"
    db.upgrade(url)
    store = Store(url)
    records: list[FinishedRequest] = []
    metrics = Metrics(device="cpu")
    log = RequestLog(store=store, metrics=metrics, subscribers=[records.append])
    app = create_app(engine, "demo", max_waiting=64, metrics=metrics, requests=log)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield Server(f"http://127.0.0.1:{port}", engine, store, log, records)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()
    store.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_completion_matches_the_engine(client, server):
    out = client.completions.create(model="demo", prompt="def fib(n):", max_tokens=24, temperature=0)
    direct = server[1].generate(["def fib(n):"], SamplingParams(max_tokens=24))[0]
    assert out.choices[0].text == direct.text
    assert out.usage.completion_tokens == 24 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(direct.prompt_token_ids)


def test_chat_and_models(client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "sort a list"}],
                                         max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.completion_tokens <= 16


def test_streaming_adds_up_to_the_whole(client):
    whole = client.completions.create(model="demo", prompt="import os\n", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="demo", prompt="import os\n", max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 30
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=10, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in chat]
    assert "".join(pieces)


def test_sixteen_concurrent_requests(client, server):
    prompts = [f"x = {i}\n" for i in range(16)]

    def one(prompt):
        return client.completions.create(model="demo", prompt=prompt, max_tokens=20, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, prompts))
    expected = server[1].generate(prompts, SamplingParams(max_tokens=20))
    assert [o.choices[0].text for o in outs] == [e.text for e in expected]
    assert [o.usage.completion_tokens for o in outs] == [len(e.token_ids) for e in expected]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"model": "demo", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "demo", "prompt": "x", "logprobs": 3}, 400, "logprobs: is not supported"),
    ({"model": "demo", "prompt": "x", "n": 2}, 400, "n:"),
    ({"model": "demo", "prompt": [1] * 5000}, 400, "max_model_len"),
    ({"prompt": "x"}, 400, "model"),
    ("{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, body, status, message):
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(server[0] + "/v1/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == status
    assert message in json.loads(err.value.read())["error"]["message"]
    assert client.completions.create(model="demo", prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_health_and_metrics(server, client):
    client.completions.create(model="demo", prompt="a", max_tokens=3)
    with urllib.request.urlopen(server[0] + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(server[0] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "optd_generation_tokens_total" in text and "optd_build_info" in text


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server):
    engine = server[1]
    body = json.dumps({"model": "demo", "prompt": "x", "max_tokens": 500, "stream": True}).encode()
    req = urllib.request.Request(server[0] + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.readline()  # the first event arrived: the request is running
    deadline = time.monotonic() + 10
    while engine.stats().requests_running and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats.requests_running == 0 and stats.kv_blocks_used == 0


# --- per-request records, latency histograms, goodput ------------------------------------------------------

def post(base: str, path: str, body: dict):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


def stream_events(base: str, path: str, body: dict) -> list[dict]:
    with post(base, path, {**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        text = r.read().decode()
    assert text.rstrip().endswith("data: [DONE]")
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def disconnect_mid_stream(server: Server) -> str:
    """Start a long streamed completion, read its first event, hang up; the request's id once recorded."""
    with post(server.url, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 500,
                                              "stream": True}) as r:
        request_id = json.loads(r.readline()[6:])["id"]
    deadline = time.monotonic() + 30
    while not any(rec.request_id == request_id for rec in server.records):
        assert time.monotonic() < deadline, "the aborted request was never recorded"
        time.sleep(0.05)
    return request_id


def test_every_request_is_recorded_with_what_the_client_got(server, client):
    t0 = time.time()
    seen = {}     # request id -> (endpoint, streamed, usage, finish_reason)
    out = client.completions.create(model="demo", prompt="def fib(n):", max_tokens=8, temperature=0)
    seen[out.id] = ("completions", False, out.usage.model_dump(), out.choices[0].finish_reason)
    out = client.completions.create(model="demo", prompt="import os\n", max_tokens=40, temperature=0,
                                    stop=["\n"])
    seen[out.id] = ("completions", False, out.usage.model_dump(), out.choices[0].finish_reason)
    out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=6, temperature=0)
    seen[out.id] = ("chat", False, out.usage.model_dump(), out.choices[0].finish_reason)
    for path, body in [("/v1/completions", {"prompt": "class A:"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "sort"}]})]:
        events = stream_events(server.url, path, {"model": "demo", "max_tokens": 7, "temperature": 0, **body})
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        seen[events[0]["id"]] = ("chat" if "chat" in path else "completions", True, events[-1]["usage"],
                                 finish[-1])
    aborted = disconnect_mid_stream(server)
    with pytest.raises(urllib.error.HTTPError) as err:     # rejected after validation: recorded
        post(server.url, "/v1/completions", {"model": "demo", "prompt": [1] * 5000})
    assert err.value.code == 400
    with pytest.raises(urllib.error.HTTPError):             # invalid: not recorded
        post(server.url, "/v1/completions", {"model": "demo", "prompt": "x", "logprobs": 1})

    server.store.flush()
    rows = {r["request_id"]: r for r in server.store.requests(since=t0)}
    assert len(rows) == len(seen) + 2
    assert {r["finish_reason"] for r in rows.values()} >= {"length", "stop"}
    for request_id, (endpoint, streamed, usage, finish_reason) in seen.items():
        row = rows.pop(request_id)
        assert (row["endpoint"], row["streamed"], row["status"], row["finish_reason"]) == \
            (endpoint, streamed, "ok", finish_reason)
        assert (row["prompt_tokens"], row["completion_tokens"]) == \
            (usage["prompt_tokens"], usage["completion_tokens"])
        assert 0 < row["ttft_s"] <= row["e2e_s"] and row["finished_at"] == pytest.approx(
            row["arrival"] + row["e2e_s"]) and row["arrival"] >= t0
        if row["completion_tokens"] > 1:
            assert 0 <= row["itl_mean_s"] <= row["itl_max_s"] <= row["e2e_s"]
        else:
            assert row["itl_mean_s"] is None
        assert (row["spec_length"], row["max_batch_size"], row["weight_bits"]) == (0, 16, 16.0)
        assert row["error"] is None
    row = rows.pop(aborted)
    assert (row["status"], row["finish_reason"], row["streamed"]) == ("aborted", "abort", True)
    assert 1 <= row["completion_tokens"] < 500 and row["ttft_s"] is not None
    [row] = rows.values()
    assert (row["status"], row["finish_reason"], row["completion_tokens"]) == ("rejected", None, 0)
    assert "max_model_len" in row["error"] and row["ttft_s"] is None


def test_latency_histograms_count_the_recorded_requests(server, client):
    client.completions.create(model="demo", prompt="import sys\n", max_tokens=5, temperature=0)
    stream_events(server.url, "/v1/completions", {"model": "demo", "prompt": "for i in", "max_tokens": 9})
    disconnect_mid_stream(server)

    def counts() -> tuple[float, float, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            samples = {s.name: s.value for f in text_string_to_metric_families(r.read().decode())
                       for s in f.samples}
        return tuple(samples[f"optd_{name}_count"] for name in (
            "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"))

    ok = [r for r in server.records if r.status == "ok"]    # every request of this module's server
    gaps = sum(r.completion_tokens - 1 for r in ok)
    assert len(server.records) > len(ok) > 0 and gaps == sum(len(r.itl_s) for r in ok) > 0
    assert counts() == (len(ok), gaps, len(ok))


def test_goodput_of_served_requests_against_a_generous_and_an_impossible_slo(server, client):
    class Clock:
        t = 0.0

        def __call__(self) -> float:
            return self.t

    generous, impossible, clock = FinishedBuffer(), FinishedBuffer(), Clock()
    server.log.subscribe(generous)
    server.log.subscribe(impossible)
    slos = [(SLO(ttft_p95=60.0, itl_p95=60.0), generous), (SLO(ttft_p95=1e-6), impossible)]
    samplers = [Sampler(server.engine.stats, lambda: server.engine.knobs, clock=clock, slo=slo,
                        finished=buffer.drain) for slo, buffer in slos]
    one = client.completions.create(model="demo", prompt="def main(", max_tokens=6, temperature=0)
    two = stream_events(server.url, "/v1/chat/completions",
                        {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    disconnect_mid_stream(server)                    # aborted: its tokens are never goodput
    clock.t += 2.0
    good = [s.sample()["goodput_tokens_per_s"] for s in samplers]
    tokens = one.usage.completion_tokens + two[-1]["usage"]["completion_tokens"]
    assert good == [pytest.approx(tokens / 2.0), 0.0]
