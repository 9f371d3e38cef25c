"""The engine against Hugging Face transformers on the same random tiny checkpoints, in float32."""

import pytest
import torch

from optd.engine import Engine, EngineConfig, SamplingParams
from optd.engine.model import ForwardBatch
from tests.engine.checkpoints import FAMILIES, make_checkpoint

PROMPTS = [[5, 9, 33, 100, 7], [42, 17], list(range(20, 60)), [3] * 11]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    import transformers

    folder = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare raw greedy continuations, EOS included
    engine = Engine(EngineConfig(model=str(folder), dtype="float32", max_model_len=128, max_num_seqs=8))
    yield hf, engine
    engine.shutdown()


def test_prefill_logits_match(pair):
    hf, engine = pair
    ids = PROMPTS[2]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    n, dev = len(ids), engine.device
    slots = torch.arange(n, device=dev)  # blocks 0.. in order
    batch = ForwardBatch(torch.arange(n, device=dev), slots, prefill_lens=[n])
    with torch.inference_mode():
        got = engine.model(torch.tensor(ids, device=dev), batch, engine.pool).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_greedy_batch_matches_token_for_token(pair):
    hf, engine = pair
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        assert out.token_ids == ref.tolist()
        assert out.finish_reason == "length"


def test_decode_logits_match_after_prefill(pair):
    """Decode-path logits (paged attention over the cache) equal HF's at the same positions."""
    hf, engine = pair
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    full = PROMPTS[0] + out.token_ids
    with torch.no_grad():
        hf_logits = hf(torch.tensor([full])).logits[0]
    # Greedy choice at every decode position must be HF's argmax at that position.
    assert out.token_ids == hf_logits[len(PROMPTS[0]) - 1 : -1].argmax(-1).tolist()
