"""Quality of the demo target by weight_bits: probe top-1 / KL and held-out perplexity (CPU or GPU).

    python bench/weight_bits_quality.py [--device cpu]

Perplexity is over the first 1024 tokens of the standard library's py_compile.py, which bench/forge.py
kept out of training; the probe is engine.probe() against the 16-bit reference.
"""

import argparse
import sysconfig
import tempfile
from pathlib import Path

import torch

from optd.engine import Engine, EngineConfig
from optd.engine.model import ForwardBatch
from optd.engine.weight_bits import current_bits


def perplexity(engine: Engine, ids: list[int]) -> float:
    dev, n = engine.device, len(ids)
    batch = ForwardBatch(torch.arange(n, device=dev), torch.arange(n, device=dev), prefill_lens=[n])
    with torch.inference_mode():
        logits = engine.model(torch.tensor(ids, device=dev), batch, engine.pool)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=dev))
    return nll.exp().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    text = (Path(sysconfig.get_paths()["stdlib"]) / "py_compile.py").read_text()
    with tempfile.TemporaryDirectory() as cache, \
            Engine(EngineConfig(model="demo", device=args.device, quality_cache_dir=cache)) as engine:
        ids = engine.tokenizer.encode(text)[: engine.max_model_len]
        print(f"device {engine.device}, dtype {engine.dtype}; {len(ids)} held-out tokens")
        print(f"{'bits':>5} {'layers':>22} {'top1':>7} {'KL':>8} {'ppl':>7} {'weight MB':>10} "
              f"{'switch s':>9}")
        for bits in (16, 12, 8, 6, 4, 16):
            outcome = engine.apply(weight_bits=bits)["weight_bits"]
            assert outcome.status == "applied", outcome
            q = engine.probe()
            layers = ",".join(str(b) for b in current_bits(engine.model))
            print(f"{bits:>5} {layers:>22} {q.top1:>7.3f} {q.kl:>8.4f} {perplexity(engine, ids):>7.2f} "
                  f"{engine.stats().weight_bytes / 1e6:>10.2f} {outcome.cost_s:>9.2f}")


if __name__ == "__main__":
    main()
