"""Continuous batching: batch invariance, preemption, and the max_batch_size knob."""

import random
import threading
import time

from optd.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 384) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def test_concurrent_requests_match_each_alone(engine):
    batch = prompts(20)
    together = engine.generate(batch, GREEDY)
    alone = [engine.generate([p], GREEDY)[0] for p in batch]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 24 for o in together)
    assert engine.stats().kv_blocks_used == 0  # every block returned


def test_small_pool_preempts_and_still_gives_same_tokens(engine, llama_dir):
    batch = prompts(20, seed=1)
    expected = [o.token_ids for o in engine.generate(batch, GREEDY)]
    # 12 blocks of 16 tokens: at most a few of the 20 sequences (up to 64 tokens each) fit at once.
    config = EngineConfig(model=str(llama_dir), dtype="float32", max_model_len=128, max_num_seqs=32,
                          num_kv_blocks=12)
    with Engine(config) as small:
        got = small.generate(batch, GREEDY)
        stats = small.stats()
    assert stats.preemptions_total > 0
    assert [o.token_ids for o in got] == expected
    assert stats.kv_blocks_used == 0


def _spy_on_steps(engine: Engine) -> list[tuple[int, int]]:
    """Record (sequences in the step, knob in force) for every step; calls the real runner."""
    seen: list[tuple[int, int]] = []
    runner = engine.runner
    for name in ("prefill", "decode"):
        real = getattr(runner, name)

        def spy(seqs, *args, real=real):
            seen.append((len(engine.scheduler.running), engine.scheduler.max_batch_size))
            return real(seqs, *args)

        setattr(runner, name, spy)
    return seen


def _wait_for_tokens(engine: Engine, n: int) -> None:
    while engine.stats().generation_tokens_total < n:
        time.sleep(0.005)


def test_max_batch_size_knob_lowered_and_raised_mid_run(llama_dir):
    config = EngineConfig(model=str(llama_dir), dtype="float32", max_model_len=128, max_num_seqs=16)
    with Engine(config) as engine:
        seen = _spy_on_steps(engine)
        params = SamplingParams(max_tokens=60, ignore_eos=True)
        results = []
        worker = threading.Thread(target=lambda: results.extend(engine.generate(prompts(12, 2), params)))
        worker.start()
        _wait_for_tokens(engine, 40)
        lowered = engine.apply(max_batch_size=3)
        assert lowered.ok and engine.knobs.max_batch_size == 3
        _wait_for_tokens(engine, 200)
        raised = engine.apply(max_batch_size=16)
        assert raised.ok
        worker.join()
    assert all(running <= knob for running, knob in seen)
    first_low = next(i for i, (_, knob) in enumerate(seen) if knob == 3)
    assert max(r for r, _ in seen[:first_low]) > 3  # it was running more before lowering
    assert max(r for r, knob in seen[first_low:] if knob == 16) > 3  # and grew back after raising
    assert [len(o.token_ids) for o in results] == [60] * 12


def test_invalid_knob_values_are_rejected_and_change_nothing(engine):
    before = engine.knobs
    for changes in ({"max_batch_size": 0}, {"max_batch_size": 33}, {"max_batch_size": 2.5},
                    {"max_batch_size": "8"}, {"max_batch_size": True}, {"no_such_knob": 1},
                    {"spec_length": 2}, {"kv_compression": 1.0}, {"weight_bits": 3}):
        result = engine.apply(**changes)
        (name,) = changes
        assert result[name].status == "rejected"
        assert result[name].reason
        assert engine.knobs == before
