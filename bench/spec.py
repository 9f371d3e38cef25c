"""Speculative decoding on a GPU: tokens/s and acceptance against spec_length, one run.

    python bench/spec.py                                   # the demo pair
    python bench/spec.py --target DIR --draft DIR          # e.g. a pair from forge.py --size large

For batch sizes 1 and 16 and k = 0..8: decode tokens/s (greedy, 128 new tokens after each of 16
prompts taken from standard-library files, run `batch` at a time), the acceptance rate
(accepted / drafted tokens), the tokens per step, and the speed-up over k = 0. Beside it: an engine
built without a drafter, run interleaved with k = 0 (which must cost the same), and the bandwidth
bound at k = 0 (copy bandwidth / bytes of weights read per step).
"""

import argparse
import statistics
import sysconfig
import time
from pathlib import Path

import torch
from decode import copy_bandwidth

from optd.engine import Engine, EngineConfig, SamplingParams


def code_prompts(n: int) -> list[str]:
    """The first lines of n standard-library files, spread over the sorted list."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    step = max(len(files) // n, 1)
    return [f.read_text(errors="replace")[:400] for f in files[::step][:n]]


def measure(engine: Engine, prompts: list[str], batch: int, new_tokens: int,
            reps: int) -> tuple[float, float, float]:
    """Decode tokens/s (median over reps) with the prompts run `batch` at a time, one group after
    another, so that batch 1 is not one prompt's luck; acceptance rate and tokens per step."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts[:batch], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    before = engine.stats()
    rates = []
    for _ in range(reps):
        tokens = seconds = 0.0
        for i in range(0, len(prompts), batch):
            outputs = engine.generate(prompts[i : i + batch], params)
            tokens += sum(len(o.token_ids) - 1 for o in outputs)
            seconds += max(o.e2e_s for o in outputs) - max(o.ttft_s for o in outputs)
        rates.append(tokens / seconds)
    after = engine.stats()
    drafts = after.spec_drafts_total - before.spec_drafts_total
    drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    nan = float("nan")
    return (statistics.median(rates), accepted / drafted if drafted else nan,
            1 + accepted / drafts if drafts else nan)


def k0_against_no_drafter(plain: Engine, spec: Engine, prompts: list[str], batch: int, new_tokens: int,
                          pairs: int) -> tuple[float, float, float]:
    """Medians of plain and k = 0 over interleaved runs (ABBA, so drift hits both alike), and their ratio."""
    spec.apply(spec_length=0)
    a, b = [], []
    for i in range(pairs):
        order = [(plain, a), (spec, b)] if i % 2 == 0 else [(spec, b), (plain, a)]
        for engine, rates in order:
            rates.append(measure(engine, prompts, batch, new_tokens, 1)[0])
    ma, mb = statistics.median(a), statistics.median(b)
    return ma, mb, mb / ma


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="demo")
    p.add_argument("--draft", default="demo-draft")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--pairs", type=int, default=10, help="interleaved runs for k=0 against no drafter")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    prompts = code_prompts(max(batches))
    common = dict(model=args.target, max_num_seqs=max(batches), max_model_len=1024,
                  gpu_memory_utilization=0.4)

    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {bandwidth / 1e9:.0f} GB/s")
    start = time.perf_counter()
    plain = Engine(EngineConfig(**common))
    plain_s, start = time.perf_counter() - start, time.perf_counter()
    spec = Engine(EngineConfig(**common, draft_model=args.draft, max_spec_length=args.max_k))
    spec_s = time.perf_counter() - start
    weight_bytes = plain.weight_bytes
    print(f"target {args.target}: {weight_bytes / 1e6:.0f} MB of weights (embedding aside); bandwidth "
          f"bound at batch 1: {bandwidth / weight_bytes:.0f} tokens/s; start-up {plain_s:.1f} s without "
          f"a drafter, {spec_s:.1f} s with (graph capture included)")
    rows = {}
    for k in range(args.max_k + 1):
        assert spec.apply(spec_length=k).ok
        rows[k] = {b: measure(spec, prompts, b, args.new_tokens, args.reps) for b in batches}
    step_time = spec.stats().step_time_s
    baseline = {b: k0_against_no_drafter(plain, spec, prompts, b, args.new_tokens, args.pairs)
                for b in batches}
    plain.shutdown()
    spec.shutdown()

    print(f"\ndraft {args.draft}; median tokens/s (acceptance rate, tokens per step) [speed-up over k=0]; "
          f"greedy, {args.new_tokens} new tokens")
    print(f"{'k':>3}" + "".join(f"{'batch ' + str(b):>36}" for b in batches) + f"{'step ms (b=last)':>18}")
    for k, by_batch in rows.items():
        cells = "".join(f"{rate:>10.1f} ({acc:>4.2f}, {length:>4.2f}) [{rate / rows[0][b][0]:>5.2f}x]"
                        for b, (rate, acc, length) in by_batch.items())
        print(f"{k:>3}{cells}{step_time.get(k, float('nan')) * 1e3:>18.3f}")
    for b in batches:
        best = max(rows, key=lambda k: rows[k][b][0])
        plain_rate, k0_rate, ratio = baseline[b]
        print(f"batch {b}: best k = {best}, {rows[best][b][0] / rows[0][b][0]:.2f}x over k=0; "
              f"interleaved medians over {args.pairs} runs each: no drafter {plain_rate:.1f}, "
              f"k=0 {k0_rate:.1f}, k=0 / no drafter = {ratio:.3f}")


if __name__ == "__main__":
    main()
