"""The quality probe: it measures the serving path, its reference is right and kept on disk."""

import pytest
import torch

from optd.engine import Engine, EngineConfig, EngineError, SamplingParams
from optd.engine.loader import BUNDLED
from optd.engine.probe_texts import PROBE_TEXTS


def test_the_reference_is_the_models_distribution_as_transformers_computes_it(tmp_path):
    import transformers

    # float32 on the CPU on both sides (on a GPU the engine would run bf16: a different reference).
    config = EngineConfig(model="demo", device="cpu", dtype="float32", quality_cache_dir=str(tmp_path))
    with Engine(config) as engine:
        report = engine.probe()
        texts = [engine.tokenizer.encode(t) for t in PROBE_TEXTS]
    assert (report.top1, report.kl) == (1.0, 0.0)
    reference = torch.load(next(tmp_path.glob("*.pt")), weights_only=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED["demo"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.cat([
            torch.log_softmax(hf(torch.tensor([ids])).logits[0, len(ids) // 2 - 1 : -1], -1) for ids in texts
        ])
    assert reference.shape == expected.shape == (report.positions, engine.model_config.vocab_size)
    torch.testing.assert_close(reference, expected, rtol=1e-3, atol=1e-3)


def test_a_change_on_the_serving_path_shows_and_the_reference_comes_from_disk(tmp_path):
    config = EngineConfig(model="demo", quality_cache_dir=str(tmp_path))
    with Engine(config) as engine:
        engine.probe()
    with Engine(config) as engine:  # a new engine: its reference can only come from the file
        with torch.no_grad():
            engine.model.layers[2].mlp.down.weight.mul_(1.5)  # what bad quantization would do
        report = engine.probe()
    assert report.kl > 1e-3 and report.top1 < 1.0, report


def test_probe_between_requests_leaves_serving_alone():
    with Engine(EngineConfig(model="demo", max_num_seqs=4)) as engine:
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        before = engine.generate(["def f(x):"], params)[0].token_ids
        assert engine.probe().top1 == 1.0
        assert engine.generate(["def f(x):"], params)[0].token_ids == before
        assert engine.stats().kv_blocks_used == 0


def test_a_full_cache_refuses_the_probe_clearly_and_changes_nothing():
    with Engine(EngineConfig(model="demo", num_kv_blocks=4, max_model_len=64)) as engine:
        alloc, held = engine.scheduler.allocator, []
        engine._call(lambda: alloc.grow(held, 4))  # as if requests held every block
        with pytest.raises(EngineError, match="KV cache is full"):
            engine.probe()
        assert alloc.num_free == 0
        engine._call(lambda: alloc.release(held))
        assert engine.probe().top1 == 1.0
