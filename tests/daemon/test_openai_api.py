"""The OpenAI-compatible API through the official `openai` client, against a real server on a free port."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn

from optd.daemon.app import create_app
from optd.daemon.metrics import Metrics
from optd.engine import Engine, EngineConfig, SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    engine = Engine(EngineConfig(model="demo", max_num_seqs=16))
    app = create_app(engine, "demo", max_waiting=64, metrics=Metrics(device="cpu"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


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
