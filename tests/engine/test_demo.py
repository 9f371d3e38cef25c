"""The bundled demo pair: a trained model, computed correctly by the engine."""

import sysconfig
from pathlib import Path

import pytest
import torch

from optd.engine import Engine, EngineConfig, SamplingParams
from optd.engine.model import ForwardBatch


@pytest.fixture(scope="module")
def demo():
    with Engine(EngineConfig(model="demo", max_num_seqs=4)) as engine:
        yield engine


def test_perplexity_on_held_out_standard_library_file(demo):
    """A trained model predicts Python well; random or mis-loaded weights give thousands."""
    # py_compile.py is in bench/forge.py's held-out split (sha256 bucket of its relative path < 200).
    text = (Path(sysconfig.get_paths()["stdlib"]) / "py_compile.py").read_text()
    ids = demo.tokenizer.encode(text)[: demo.max_model_len]  # the 1024 tokens it was trained on
    n = len(ids)
    dev = demo.device
    batch = ForwardBatch(torch.arange(n, device=dev), torch.arange(n, device=dev), prefill_lens=[n])
    with torch.inference_mode():
        logits = demo.model(torch.tensor(ids, device=dev), batch, demo.pool)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=dev))
    assert nll.exp().item() < 25  # 14.7 with the shipped weights


def test_generates_python(demo):
    out = demo.generate(["def fib(n):"], SamplingParams(max_tokens=40))[0]
    assert "\n" in out.text and ("return" in out.text or '"""' in out.text)


def test_draft_shares_the_tokenizer():
    from optd.engine.loader import BUNDLED

    target, draft = (BUNDLED[name] / "tokenizer.json" for name in ("demo", "demo-draft"))
    assert target.read_bytes() == draft.read_bytes()
