"""The weight_bits knob: bits per layer, requantizing while serving, quality by bits, exact return."""

import itertools
import threading

import pytest
import torch

from optd.engine import Engine, EngineConfig, SamplingParams
from optd.engine.linear import Linear
from optd.engine.weight_bits import assign_bits, current_bits, set_layer_bits
from optd.kernels.quantize import quantized_bytes

PROMPTS = ["def fib(n):", "import os\n\nclass Path:", "for i in range(10):\n    "]


@pytest.mark.parametrize("target", [4, 8, 16])
def test_a_format_is_assigned_to_every_layer(target):
    assert assign_bits(target, 6, None) == [target] * 6


def test_mixed_assignment_spends_the_budget_where_it_hurts_least():
    sensitivity = {i: {4: kl, 8: kl / 10} for i, kl in enumerate([0.5, 0.01, 0.02, 0.3, 0.04, 0.05])}
    bits = assign_bits(6, 6, sensitivity)
    assert sum(bits) == 36
    best = min((c for c in itertools.product((4, 8, 16), repeat=6) if sum(c) <= 36),
               key=lambda c: sum(0 if b == 16 else sensitivity[i][b] for i, b in enumerate(c)))
    damage = lambda c: sum(0 if b == 16 else sensitivity[i][b] for i, b in enumerate(c))  # noqa: E731
    assert damage(bits) == pytest.approx(damage(best))
    assert bits[0] >= 8 and bits[3] >= 8 and bits[1] == 4  # the sensitive layers keep more bits


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    config = EngineConfig(model="demo", max_num_seqs=4, quality_cache_dir=str(tmp_path_factory.mktemp("q")))
    with Engine(config) as engine:
        yield engine


def test_quality_and_bytes_by_bits_and_an_exact_return_to_16(demo):
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    before = [o.token_ids for o in demo.generate(PROMPTS, params)]
    full = demo.stats().weight_bytes
    assert demo.probe().kl == 0.0
    report = {}
    for bits in (8, 6, 4):
        outcome = demo.apply(weight_bits=bits)["weight_bits"]
        assert outcome.status == "applied" and outcome.value == bits, outcome
        report[bits] = demo.probe()
        if bits == 8:  # int8 per output channel: a byte per weight and a scale per row, in the model dtype
            shapes = [(m.out_features, m.in_features) for m in demo.model.modules() if isinstance(m, Linear)]
            # At 8 bits or fewer the lm_head is int8 too: the demo's is tied, so that is a copy of the
            # embedding's [vocab, hidden] (the embedding stays 16-bit for the lookup).
            cfg = demo.model_config
            shapes.append((cfg.vocab_size, cfg.hidden_size))
            scale = demo.dtype.itemsize
            assert demo.stats().weight_bytes == sum(n * k + scale * n for n, k in shapes)
            assert demo.model.head_quant is not None
        print(f"weight_bits {bits}: top1 {report[bits].top1:.3f} kl {report[bits].kl:.4f} "
              f"weight_bytes {demo.stats().weight_bytes}")
    assert 0 < report[8].kl < report[6].kl < report[4].kl
    assert report[8].top1 > report[4].top1
    # int4 layers (4 bits plus group scales and zeros) and the int8 copy of the tied lm_head
    linears = [(m.out_features, m.in_features) for m in demo.model.modules() if isinstance(m, Linear)]
    cfg = demo.model_config
    assert demo.stats().weight_bytes == sum(quantized_bytes(n, k, 4, demo.dtype) for n, k in linears) + (
        quantized_bytes(cfg.vocab_size, cfg.hidden_size, 8, demo.dtype))
    assert demo.apply(weight_bits=16)["weight_bits"].status == "applied"
    assert demo.stats().weight_bytes == full and demo.model.head_quant is None
    assert [o.token_ids for o in demo.generate(PROMPTS, params)] == before


def test_mixed_precision_beats_a_uniform_mix_with_the_same_average(demo):
    assert demo.apply(weight_bits=6)["weight_bits"].status == "applied"
    mixed = demo.probe().kl
    assigned = current_bits(demo.model)
    assert sum(assigned) / len(assigned) == 6
    # The same average with the bits spread evenly instead of by measured sensitivity.
    alternating = [4, 8] * (len(assigned) // 2)

    def set_all(bits):
        for layer, b in enumerate(bits):
            demo._call(lambda layer=layer, b=b: set_layer_bits(demo.model, demo._model_folder,
                                                                 demo.model_config, layer, b))
    set_all(alternating)
    uniform = demo.probe().kl
    set_all(assigned)
    print(f"6 bits: mixed {assigned} kl {mixed:.4f}, alternating {alternating} kl {uniform:.4f}")
    assert mixed < uniform
    assert demo.apply(weight_bits=16)["weight_bits"].status == "applied"


def test_switching_while_requests_stream_fails_none(demo):
    params = SamplingParams(max_tokens=96, ignore_eos=True)
    expected = [o.token_ids for o in demo.generate(PROMPTS, params)]
    outputs = []
    worker = threading.Thread(target=lambda: outputs.extend(demo.generate(PROMPTS * 2, params)))
    worker.start()
    for bits in (4, 8, 16):
        assert demo.apply(weight_bits=bits)["weight_bits"].status == "applied"
    worker.join()
    assert all(o.finish_reason == "length" and len(o.token_ids) == 96 for o in outputs)
    assert [o.token_ids for o in demo.generate(PROMPTS, params)] == expected


@pytest.mark.parametrize("value", [3, 17, "8", True])
def test_invalid_values_are_rejected_with_a_reason(demo, value):
    outcome = demo.apply(weight_bits=value)["weight_bits"]
    assert outcome.status == "rejected" and "weight_bits must be a number in 4..16" in outcome.reason
    assert demo.knobs.weight_bits == 16


def test_an_untied_lm_head_goes_int8_at_8_bits_and_comes_back_from_the_checkpoint(llama_dir):
    """At 8 bits or fewer the lm_head is held in int8 and its 16-bit weight is freed; back at 16 bits it
    is re-read from the checkpoint, so outputs are exactly as before (a head left quantized, or restored
    from the wrong tensor, changes them)."""
    config = EngineConfig(model=str(llama_dir), dtype="float32", max_model_len=128, max_num_seqs=4)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    with Engine(config) as engine:
        head = engine.model.lm_head.weight.clone()
        before = [o.token_ids for o in engine.generate(PROMPTS, params)]
        full = engine.stats().weight_bytes
        assert engine.apply(weight_bits=8)["weight_bits"].status == "applied"
        assert engine.model.head_quant is not None and engine.model.lm_head.weight.numel() == 0
        n, k = head.shape
        layers = sum(m.nbytes for m in engine.model.modules() if isinstance(m, Linear))
        assert engine.stats().weight_bytes == layers + n * k + 4 * n  # int8 codes and a float32 scale per row
        assert engine.stats().weight_bytes < 0.3 * full
        assert engine.apply(weight_bits=16)["weight_bits"].status == "applied"
        assert engine.model.head_quant is None and torch.equal(engine.model.lm_head.weight, head)
        assert engine.stats().weight_bytes == full
        assert [o.token_ids for o in engine.generate(PROMPTS, params)] == before
