"""Speculative decoding on a GPU: tokens/s and acceptance against spec_length, one run.

    python bench/spec.py                                   # the demo pair
    python bench/spec.py --target DIR --draft DIR          # e.g. a pair from forge.py --size large

For batch sizes 1 and 16 and k = 0..8: decode tokens/s (greedy, 128 new tokens after a prompt
taken from a standard-library file), the acceptance rate (accepted / drafted tokens) and the
speed-up over k = 0. Beside it: an engine built without a drafter (k = 0 must cost the same), and
the bandwidth bound at k = 0 (copy bandwidth / bytes of weights read per step).
"""

import argparse
import sysconfig
from pathlib import Path

import torch
from decode import copy_bandwidth, decode_rate

from optd.engine import Engine, EngineConfig, SamplingParams


def code_prompts(n: int) -> list[str]:
    """The first lines of n standard-library files, spread over the sorted list."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    step = max(len(files) // n, 1)
    return [f.read_text(errors="replace")[:400] for f in files[::step][:n]]


def measure(engine: Engine, prompts: list[str], new_tokens: int, reps: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    before = engine.stats()
    rates = [decode_rate(engine.generate(prompts, params)) for _ in range(reps)]
    after = engine.stats()
    drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    return max(rates), accepted / drafted if drafted else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="demo")
    p.add_argument("--draft", default="demo-draft")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    prompts = code_prompts(max(batches))
    common = dict(model=args.target, max_num_seqs=max(batches), max_model_len=1024)

    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {bandwidth / 1e9:.0f} GB/s")
    # The engine without a drafter is measured before and after the others (GPU clocks and caches
    # warm up over a run); the better of the two is compared with k = 0.
    with Engine(EngineConfig(**common)) as plain:
        weight_bytes = sum(q.numel() * q.element_size() for q in plain.model.parameters())
        baseline = {b: measure(plain, prompts[:b], args.new_tokens, args.reps)[0] for b in batches}
    print(f"target {args.target}: {weight_bytes / 1e6:.0f} MB of weights; bandwidth bound at batch 1: "
          f"{bandwidth / weight_bytes:.0f} tokens/s")
    rows = {}
    with Engine(EngineConfig(**common, draft_model=args.draft, max_spec_length=args.max_k)) as engine:
        for k in range(args.max_k + 1):
            assert engine.apply(spec_length=k).ok
            rows[k] = {b: measure(engine, prompts[:b], args.new_tokens, args.reps) for b in batches}
        step_time = engine.stats().step_time_s
    with Engine(EngineConfig(**common)) as plain:
        for b in batches:
            baseline[b] = max(baseline[b], measure(plain, prompts[:b], args.new_tokens, args.reps)[0])

    print(f"\ndraft {args.draft}; tokens/s (acceptance rate) [speed-up over k=0]; greedy, "
          f"{args.new_tokens} new tokens")
    print(f"{'k':>3}" + "".join(f"{'batch ' + str(b):>30}" for b in batches) + f"{'step ms (b=last)':>18}")
    print(f"{'-':>3}" + "".join(f"{baseline[b]:>12.1f} (no drafter){'':>5}" for b in batches))
    for k, by_batch in rows.items():
        cells = "".join(f"{rate:>12.1f} ({acc:>5.2f}) [{rate / rows[0][b][0]:>5.2f}x]"
                        for b, (rate, acc) in by_batch.items())
        print(f"{k:>3}{cells}{step_time.get(k, float('nan')) * 1e3:>18.2f}")
    for b in batches:
        best = max(rows, key=lambda k: rows[k][b][0])
        print(f"batch {b}: best k = {best}, {rows[best][b][0] / rows[0][b][0]:.2f}x over k=0; "
              f"k=0 / no drafter = {rows[0][b][0] / baseline[b]:.3f}")


if __name__ == "__main__":
    main()
