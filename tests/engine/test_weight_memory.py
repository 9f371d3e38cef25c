"""Memory released by fewer weight bits becomes KV capacity, and is given back before more bits need it
(the demo model on CPU, float32: "16-bit" weights and the native cache take 4 bytes an element here)."""

import threading
from concurrent.futures import Future

import pytest
import torch

from optd.engine import Engine, EngineConfig, SamplingParams, weight_bits
from optd.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from optd.engine.linear import Linear
from optd.engine.weight_bits import WeightSwitch, current_bits, set_layer_bits
from optd.kernels.quantize import packed_bytes, quantize_int4, quantize_int8, quantized_bytes
from tests.engine.kv_check import stored_vs_truth
from tests.engine.retrieval import long_prompt

START_BLOCKS = 40
# 32 sequences of 256 tokens would fill 512 blocks: a cap above what 4 bits free on the demo model.
MAX_NUM_SEQS, MAX_MODEL_LEN = 32, 256
PROMPTS = ["def fib(n):", "import os\n\nclass Path:", "for i in range(10):\n    "]


def config() -> EngineConfig:
    return EngineConfig(model="demo", max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN,
                        num_kv_blocks=START_BLOCKS)


def test_pool_resize_and_move_keep_blocks_and_their_formats():
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.bfloat16)
    pool = KVPool(layout, 6, torch.device("cpu"))
    data = torch.randint(0, 256, (3, 6, layout.block_bytes), dtype=torch.uint8)
    pool.write(slice(None), list(range(6)), data)
    pool.page_meta[:] = torch.arange(6) * 256 + 7
    pool.resize(10)
    assert [pool.layer_data(i).shape for i in range(3)] == [(10, layout.block_bytes)] * 3
    assert torch.equal(pool.read(list(range(6))), data) and not pool.read([6, 7, 8, 9]).any()
    assert pool.page_meta.tolist() == [i * 256 + 7 for i in range(6)] + [0] * 4
    pool.move([4, 5], [8, 9])
    assert torch.equal(pool.read([8, 9]), data[:, 4:6])
    assert pool.page_meta[8:].tolist() == [4 * 256 + 7, 5 * 256 + 7]
    pool.resize(9)
    assert pool.num_blocks == 9 and torch.equal(pool.read([8]), data[:, 4:5])
    assert torch.equal(pool.read(list(range(4))), data[:, :4]) and len(pool.page_meta) == 9
    # The K/V views are rebuilt on the new tensors: a write through them lands in the layer's bytes.
    k, v = pool.layer(2)
    assert k.shape == (9, 4, 2, 16)
    v[8].fill_(1.5)
    half = layout.block_bytes // 2
    assert torch.equal(pool.layer_data(2)[8, :half], data[2, 4, :half])  # K kept (compared as bytes: NaNs)
    assert torch.equal(pool.read_native([8])[2, 0, 1], torch.full((4, 2, 16), 1.5, dtype=torch.bfloat16))


def test_allocator_resize_compacts_and_refuses_an_impossible_shrink():
    alloc = BlockAllocator(8, 16)
    a, b = [], []
    alloc.grow(a, 3)  # 1, 2, 3
    alloc.grow(b, 4)  # 4, 5, 6, 7
    alloc.truncate(a, 1)  # 2 and 3 are free again
    with pytest.raises(ValueError, match=r"cannot shrink the KV allocator to 5 blocks: blocks \[6, 7\]"):
        alloc.resize(5)
    assert alloc.num_blocks == 8 and alloc.num_free == 3  # unchanged
    alloc.resize(12)
    assert (alloc.num_blocks, alloc.num_free) == (12, 7)
    copies = []
    alloc.compact([a, b], 5, lambda src, dst: copies.append((src, dst)))
    assert copies == [([6, 7], [2, 3])] and a == [1] and b == [4, 5, 2, 3]
    alloc.resize(5)
    assert (alloc.num_blocks, alloc.num_free, alloc.num_used) == (5, 0, 5)
    with pytest.raises(ValueError, match="cannot compact 5 blocks in use into 4"):
        alloc.compact([a, b], 4, lambda src, dst: None)
    alloc.release(b)
    alloc.grow(a, 5)
    assert sorted(a) == [1, 2, 3, 4, 5]  # ids stay 1..num_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sizes_from_shapes_match_the_quantizers(dtype):
    for n, k in [(8, 128), (5, 300), (3, 7)]:  # whole groups, a ragged last group and word, K < 8
        w = torch.randn(n, k).to(dtype)
        assert quantized_bytes(n, k, 8, dtype) == packed_bytes(quantize_int8(w))
        assert quantized_bytes(n, k, 4, dtype) == packed_bytes(quantize_int4(w))


@pytest.fixture(scope="module")
def engine():
    with Engine(config()) as e:
        yield e


def max_concurrent(engine: Engine, requests: int) -> int:
    """Most sequences running at once for `requests` ~100-token prompts (7 blocks each)."""
    prompt = long_prompt(100, engine.tokenizer)
    outs = []
    worker = threading.Thread(target=lambda: outs.extend(
        engine.generate([prompt] * requests, SamplingParams(max_tokens=8, ignore_eos=True))))
    worker.start()
    most = 0
    while worker.is_alive():
        most = max(most, engine._call(lambda: len(engine.scheduler.running)))
    worker.join()
    assert len(outs) == requests and all(o.finish_reason == "length" for o in outs)
    return most


def pool_blocks(engine: Engine) -> tuple[int, int, int]:
    return engine.stats().kv_blocks_total, engine.scheduler.allocator.num_blocks, engine.pool.num_blocks - 1


def test_fewer_bits_grow_the_pool_by_the_bytes_they_free(engine):
    item = engine.dtype.itemsize
    shapes = [(m.out_features, m.in_features) for m in engine.model.modules() if isinstance(m, Linear)]
    # int4: eight codes per int32 word, a scale and a zero point per 128 inputs of a row.
    freed = sum(n * k * item - (n * -(-k // 8) * 4 + 2 * n * -(-k // 128) * item) for n, k in shapes)
    cfg = engine.model_config
    # At 8 bits or fewer the lm_head is held in int8 (a byte per weight, a scale per row): the demo's is
    # tied to the embedding, so that is bytes added, not freed.
    freed -= cfg.vocab_size * cfg.hidden_size + cfg.vocab_size * item
    per_block = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * item  # K and V of 16 tokens
    grown = START_BLOCKS + freed // per_block
    assert START_BLOCKS + 100 < grown < MAX_NUM_SEQS * MAX_MODEL_LEN // 16  # the cap does not hide it
    before = max_concurrent(engine, 12)
    assert engine.apply(weight_bits=4)["weight_bits"].status == "applied"
    assert engine.stats().weight_bytes == sum(n * k * item for n, k in shapes) - freed
    assert all(m.nbytes == m.nbytes_at(4) for m in engine.model.modules() if isinstance(m, Linear))
    assert pool_blocks(engine) == (grown, grown, grown)
    after = max_concurrent(engine, 12)
    print(f"pool {START_BLOCKS} -> {grown} blocks; most running at once {before} -> {after}")
    assert before <= START_BLOCKS // 7 and after == 12
    assert engine.apply(weight_bits=16)["weight_bits"].status == "applied"
    assert pool_blocks(engine) == (START_BLOCKS,) * 3


def test_more_bits_take_the_pool_back_first_and_lose_no_request(engine):
    assert engine.apply(weight_bits=4)["weight_bits"].status == "applied"
    grown = engine.stats().kv_blocks_total
    prompt = long_prompt(100, engine.tokenizer)
    prompts = [prompt + f"\n# request {i}\n" for i in range(12)]  # distinct: a mixed-up cache shows
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    outs = []
    worker = threading.Thread(target=lambda: outs.extend(engine.generate(prompts, params)))
    worker.start()

    def oldest_holds_a_block_above_the_start_size() -> bool:
        running = engine.scheduler.running
        return len(running) == 12 and max(running[0].blocks) > START_BLOCKS

    while not engine._call(oldest_holds_a_block_above_the_start_size):
        assert worker.is_alive(), "the requests finished before growing past the start size"
    preempted = engine.stats().preemptions_total
    done: Future = Future()

    def shrink_then_check():
        """The pool shrinks when the switch starts, before any layer changes: the sequences that keep
        running must then hold their own K/V, as the 4-bit weights compute them, in the lower blocks."""
        high = [s for s in engine.scheduler.running if max(s.blocks) > START_BLOCKS]
        assert engine._start_switch(16.0, done.set_result) is None
        running = engine.scheduler.running
        return ([s.blocks[:] for s in running], [stored_vs_truth(engine, s) for s in running],
                engine.scheduler.allocator.num_blocks, sum(s in high for s in running))

    tables, errors, blocks, moved = engine._call(shrink_then_check)
    assert done.result() is None
    worker.join()
    print(f"pool {grown} -> {blocks} blocks, {len(tables)} sequences kept ({moved} moved), errors {errors}")
    assert blocks == START_BLOCKS and pool_blocks(engine) == (START_BLOCKS,) * 3
    assert moved and all(b <= START_BLOCKS for t in tables for b in t)  # kept, their blocks moved
    # A few roundings of the dtype (bf16 on a GPU: 0.004 measured); another block's data would be off by
    # its whole magnitude.
    assert max(errors) < 2e-2
    assert engine.stats().preemptions_total > preempted
    assert len(outs) == 12 and all(o.finish_reason == "length" and len(o.token_ids) == 40 for o in outs)
    assert engine.knobs.weight_bits == 16 and engine.stats().kv_blocks_used == 0


def test_outputs_after_returning_to_16_bits_are_a_fresh_engines(engine):
    params = SamplingParams(max_tokens=16)
    for bits in (4, 16):
        assert engine.apply(weight_bits=bits)["weight_bits"].status == "applied"
    # On a GPU, torch cannot capture CUDA graphs in two threads at once (entering a capture syncs the
    # device): let this engine finish recapturing its graphs before the fresh one captures its own.
    while engine._call(lambda: engine._capture_next()):
        pass
    with Engine(config()) as fresh:
        expected = [o.token_ids for o in fresh.generate(PROMPTS, params)]
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == expected


def test_a_rolled_back_or_refused_switch_leaves_the_pool_sized_for_the_bits_held(engine, monkeypatch):
    assert engine.apply(weight_bits=4)["weight_bits"].status == "applied"
    grown = engine.stats().kv_blocks_total
    # A real out-of-memory cannot be provoked on CPU: reading the third layer's checkpoint fails once.
    load, calls = weight_bits.load_layer_weights, []

    def failing_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise MemoryError("injected")
        return load(*args, **kwargs)

    monkeypatch.setattr(weight_bits, "load_layer_weights", failing_once)
    outs = []
    worker = threading.Thread(target=lambda: outs.extend(
        engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))))
    worker.start()
    outcome = engine.apply(weight_bits=16)["weight_bits"]
    worker.join()
    monkeypatch.undo()
    assert outcome.status == "rolled_back" and "MemoryError: injected" in outcome.reason
    assert current_bits(engine.model) == [4] * 6
    assert pool_blocks(engine) == (grown,) * 3  # shrunk for 16 bits, grown back for the 4 held
    assert len(outs) == 3 and all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in outs)
    # Blocks above the start size held by no sequence (so neither preempted nor moved): no shrink.
    alloc, held = engine.scheduler.allocator, []
    engine._call(lambda: alloc.grow(held, START_BLOCKS + 1))
    outcome = engine.apply(weight_bits=16)["weight_bits"]
    assert outcome.status == "rejected" and "the KV pool cannot shrink to 40 blocks" in outcome.reason
    assert pool_blocks(engine) == (grown,) * 3 and current_bits(engine.model) == [4] * 6
    engine._call(lambda: alloc.release(held))
    assert engine.apply(weight_bits=16)["weight_bits"].status == "applied"
    assert pool_blocks(engine) == (START_BLOCKS,) * 3


def test_a_switch_frees_bytes_before_it_takes_more(engine):
    """Layers losing bits are swapped first, so the weights never hold more bytes than at either end of a
    switch (the KV pool gives back only what the larger end needs)."""
    def set_bits(bits):
        for layer, b in enumerate(bits):
            set_layer_bits(engine.model, engine._model_folder, engine.model_config, layer, b)

    def switch_between_mixes():
        set_bits([4, 4, 4, 16, 16, 16])
        start, sizes = engine.weight_bytes, []
        switch = WeightSwitch(engine.model, engine._model_folder, engine.model_config, [16, 16, 16, 4, 4, 4],
                              lambda failure: None)
        while not switch.step():
            sizes.append(engine.weight_bytes)
        end = engine.weight_bytes
        set_bits([16] * 6)
        return start, sizes, end

    start, sizes, end = engine._call(switch_between_mixes)
    assert start == end and len(sizes) == 5 and max(sizes) < start
