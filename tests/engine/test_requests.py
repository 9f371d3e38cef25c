"""Per-request behaviour: sampling, stop conditions, streaming, and bad input."""

import asyncio
import json
import shutil
import threading

import pytest

from optd.engine import Engine, EngineConfig, EngineError, SamplingParams
from tests.engine.test_batching import prompts


def test_same_seed_same_output_and_seeds_differ(engine):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    first, second = engine.generate([[5, 6, 7], [5, 6, 7]], [p, p])
    other = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=20, temperature=1.0, seed=8,
                                                        ignore_eos=True))[0]
    assert first.token_ids == second.token_ids
    assert other.token_ids != first.token_ids
    # A seeded request gives the same tokens whatever else shares its batch.
    crowd = engine.generate([[5, 6, 7], *prompts(6)], [p] + [SamplingParams(max_tokens=5)] * 6)[0]
    assert crowd.token_ids == first.token_ids


def test_top_k_1_is_greedy(engine):
    greedy = engine.generate([[9, 8, 7]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    sampled = engine.generate([[9, 8, 7]], SamplingParams(max_tokens=16, temperature=2.0, top_k=1,
                                                          ignore_eos=True, seed=3))[0]
    assert sampled.token_ids == greedy.token_ids


def test_stop_string_cuts_text_and_finishes(engine):
    full = engine.generate(["def fib(n):"], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    stop = full.text[10:13]
    assert len(stop) == 3 and full.text.find(stop) >= 0
    cut = engine.generate(["def fib(n):"], SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_eos_finishes_with_stop(engine):
    full = engine.generate([[11, 12, 13]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    eos = full.token_ids[4]
    saved = engine.tokenizer.eos_token_ids
    engine.tokenizer.eos_token_ids = {eos}
    try:
        out = engine.generate([[11, 12, 13]], SamplingParams(max_tokens=12))[0]
    finally:
        engine.tokenizer.eos_token_ids = saved
    first = full.token_ids.index(eos)
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]


def test_streamed_deltas_add_up_to_the_whole(engine):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    whole = engine.generate(["class Path:"], params)[0]

    async def stream():
        return [d async for d in engine.submit("class Path:", params)]

    deltas = asyncio.run(stream())
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 30


def test_closing_a_stream_aborts_and_frees_blocks(engine):
    async def take_three():
        stream = engine.submit([4, 5, 6], SamplingParams(max_tokens=100, ignore_eos=True))
        got = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        return got

    assert len(asyncio.run(take_three())) == 3
    engine.generate([[1, 2]], SamplingParams(max_tokens=2))  # a step boundary after the abort
    stats = engine.stats()
    assert stats.requests_running == 0 and stats.kv_blocks_used == 0


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([1] * 128, SamplingParams(), "max_model_len is 128"),
    ([], SamplingParams(), "empty"),
    ([1, 99999], SamplingParams(), "token ids"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(max_tokens=-3), "max_tokens"),
    ([1, 2], SamplingParams(temperature=-1), "temperature"),
    ([1, 2], SamplingParams(top_p=0), "top_p"),
])
def test_bad_request_is_rejected_while_others_keep_running(engine, prompt, params, message):
    results = []
    long = threading.Thread(target=lambda: results.extend(
        engine.generate([[3, 4, 5]], SamplingParams(max_tokens=50, ignore_eos=True))))
    long.start()
    with pytest.raises(EngineError, match=message):
        engine.generate([[7, 8], prompt], [SamplingParams(max_tokens=4), params])
    long.join()
    assert len(results[0].token_ids) == 50 and results[0].finish_reason == "length"


def _broken(tmp_path, llama_dir, edit) -> str:
    folder = tmp_path / "model"
    shutil.copytree(llama_dir, folder)
    edit(folder)
    return str(folder)


def _edit_config(**changes):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (lambda f: (f / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    (lambda f: (f / "config.json").unlink(), r"config\.json: missing"),
    (_edit_config(model_type="gpt2"), "model_type='gpt2' is not supported"),
    (_edit_config(hidden_act="gelu"), "'hidden_act'"),
    (_edit_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    (_edit_config(hidden_size="big"), "'hidden_size' must be int"),
    (_edit_config(num_hidden_layers=3), "lacks tensors"),
    (_edit_config(intermediate_size=100), "has shape"),
    (lambda f: (f / "tokenizer.json").unlink(), r"tokenizer\.json: missing"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), r"model\.safetensors: unreadable"),
    (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
])
def test_broken_checkpoint_is_a_clear_error(tmp_path, llama_dir, edit, message):
    with pytest.raises(EngineError, match=message):
        Engine(EngineConfig(model=_broken(tmp_path, llama_dir, edit), dtype="float32"))


def test_unknown_model_path():
    with pytest.raises(EngineError, match="no such checkpoint folder"):
        Engine(EngineConfig(model="/no/such/model"))


def test_chat_template_renders(engine):
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "# user: hi\n# assistant:"


def test_sequence_stops_at_max_model_len(engine):
    out = engine.generate([list(range(2, 122))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 128 - 120
