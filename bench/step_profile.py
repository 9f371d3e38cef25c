"""Where a batch-1 decode step's time goes on a GPU: kernel time per token by kernel, at each weight_bits.

    cd bench && python3 step_profile.py              # Llama-3-8B shape, random weights, 16 and 4 bits
    python3 step_profile.py --layers 4 --bits 16     # a quick check

One request of `--context` prompt tokens generates `--new-tokens`; the same request with one new token
(its prefill alone) is profiled too, and the difference per kernel name, divided by the decode steps, is
the decode step's kernel time by kernel (torch.profiler's CUDA activity, CUDA graphs included). Beside it:
the wall time per token (unprofiled), and the step's CUDA graph replayed back to back: wall minus that
is what the host adds between steps. Kernels launched with programmatic dependent launch (kernels/pdl.py)
are profiled from their early start, their wait for the previous kernel included: on a Hopper GPU read
the replay time, and the profile only as a ranking, or profile with --no-pdl.
"""

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from decode import LLAMA3_8B, write_checkpoint
from torch.profiler import ProfilerActivity, profile

from optd.engine import Engine, EngineConfig, SamplingParams
from optd.kernels import pdl


def kernel_us(engine: Engine, prompt: list[int], new_tokens: int) -> Counter:
    """Kernel microseconds by name for one generate."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate([prompt], SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    times: Counter = Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] += e.device_time
    return times


def generate_s(engine: Engine, prompt: list[int], new_tokens: int, repeats: int = 3) -> float:
    """Wall seconds of one generate, unprofiled (best of a few)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=new_tokens, ignore_eos=True))
        best = min(best, time.perf_counter() - start)
    return best


def replay_us(engine: Engine, n: int = 200) -> float:
    """GPU time of one batch-1 decode step alone: the captured graph replayed back to back on the engine
    thread, with no host work between replays."""
    def timed() -> float:
        graph = engine.runner.graphs[1, 1]
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / n
    return engine._call(timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=65)
    p.add_argument("--bits", default="16,4")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--no-pdl", action="store_true",
                   help="launch without programmatic dependent launch: exact kernel times, slower steps")
    args = p.parse_args()
    if args.no_pdl:
        pdl._capable = lambda index: False  # pdl_options then gives plain launches
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, LLAMA3_8B["vocab_size"], (args.context,), generator=g).tolist()
    steps = args.new_tokens - 1
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        write_checkpoint(Path(tmp), {**LLAMA3_8B, "num_hidden_layers": args.layers}, seed=0)
        config = EngineConfig(model=tmp, max_model_len=args.context + args.new_tokens + 16, max_num_seqs=1)
        with Engine(config) as engine:
            for bits in (int(b) for b in args.bits.split(",")):
                assert engine.apply(weight_bits=bits)["weight_bits"].status == "applied"
                for _ in range(2):  # graphs captured, kernels compiled
                    engine.generate([prompt], SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
                decode_s = generate_s(engine, prompt, args.new_tokens) - generate_s(engine, prompt, 1)
                wall = decode_s / steps * 1e6
                full = kernel_us(engine, prompt, args.new_tokens)
                prefill = kernel_us(engine, prompt, 1)
                per_step = Counter({k: (full[k] - prefill.get(k, 0.0)) / steps for k in full})
                total = sum(per_step.values())
                replay = replay_us(engine)
                print(f"\nweight_bits {bits}: wall {wall:.0f} us/token, kernels {total:.0f} us/token, "
                      f"the rest (launches, gaps, host) {wall - total:.0f} us; the step's graph replayed "
                      f"back to back: {replay:.0f} us (the host adds {wall - replay:.0f} us a token)")
                print(f"{'us/token':>9}{'share':>7}  kernel")
                for name, us in per_step.most_common(args.top):
                    print(f"{us:>9.1f}{us / total:>7.1%}  {name[:90]}")


if __name__ == "__main__":
    main()
