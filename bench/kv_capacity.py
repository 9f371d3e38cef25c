"""The kv_compression knob on a GPU: how many sequences a fixed KV budget holds at each ratio on an
8B-shaped model, and what each ratio costs in quality and speed on the demo pair.

    cd bench && python3 kv_capacity.py                  # Llama-3-8B shape (random weights), then demo
    python3 kv_capacity.py --layers 4 --kv-gib 0.25     # a quick check
    python3 kv_capacity.py --bits 16,8,4 --ratios 0 --no-demo   # the pool grown by fewer weight bits

Capacity: requests with `--context`-token prompts arrive all at once into a pool of `--kv-gib` GiB;
the most sequences running at once, preemptions, bytes per token and decode tokens/s are reported per
ratio (and per weight_bits, whose freed bytes the pool grows into), beside what the native pool would
hold. Quality: engine.probe() (top-1 agreement and KL against
the 16-bit cache) and the recall gain of tests/engine/retrieval.py (nats a name's definition ~600
tokens earlier adds to the name's log-probability where it is used), on the demo model.
"""

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from decode import LLAMA3_8B, decode_rate, write_checkpoint

from optd.engine import Engine, EngineConfig, SamplingParams

RATIOS = (0.0, 0.5, 0.75, 0.875)


def capacity(folder: Path, args) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, LLAMA3_8B["vocab_size"], (args.requests, args.context), generator=g).tolist()
    config = EngineConfig(model=str(folder), max_model_len=args.context + args.new_tokens + 64,
                          max_num_seqs=args.requests, kv_cache_memory=int(args.kv_gib * 2**30),
                          max_num_batched_tokens=16384)
    with Engine(config) as engine:
        engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        for bits, r in [(b, r) for b in args.bits for r in args.ratios]:
            assert engine.apply(weight_bits=bits, kv_compression=r).ok
            engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # graphs captured
            preempted = engine.stats().preemptions_total
            most, per_token, outs = 0, [], []
            params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
            worker = threading.Thread(target=lambda o=outs, p=params: o.extend(engine.generate(prompts, p)))
            start = time.perf_counter()
            worker.start()
            while worker.is_alive():
                running = engine._call(lambda: len(engine.scheduler.running))
                if running > most:
                    most, per_token = running, [engine.stats()]
                time.sleep(0.005)
            worker.join()
            s = per_token[0] if per_token else engine.stats()
            rows.append({"bits": bits, "r": r, "most": most,
                         "preempted": engine.stats().preemptions_total - preempted,
                         "bytes_per_token": s.kv_bytes_per_token, "achieved": s.kv_compression_achieved,
                         "tokens_per_s": decode_rate(outs), "wall_s": time.perf_counter() - start,
                         "blocks": s.kv_blocks_total, "native_per_token": engine.pool.layout.bytes_per_token})
        engine.apply(kv_compression=0.0)
    return rows


def demo_quality() -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.engine.retrieval import recall_gain  # the CI check, here on the GPU

    rows = []
    with tempfile.TemporaryDirectory() as cache, Engine(EngineConfig(
            model="demo", draft_model="demo-draft", max_model_len=1024, max_num_seqs=16,
            quality_cache_dir=cache)) as engine:
        prompts = [f"def f{i}(x):\n    " for i in range(16)]
        for r in RATIOS:
            assert engine.apply(kv_compression=r, spec_length=0).ok
            report = engine.probe()
            gain = recall_gain(engine, 600)
            engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
            rate = decode_rate(engine.generate(prompts, SamplingParams(max_tokens=256, ignore_eos=True)))
            assert engine.apply(spec_length=4).ok
            spec = decode_rate(engine.generate(prompts, SamplingParams(max_tokens=256, ignore_eos=True)))
            rows.append({"r": r, "top1": report.top1, "kl": report.kl, "recall_gain": gain,
                         "tokens_per_s": rate, "spec4_tokens_per_s": spec})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-gib", type=float, default=4.0)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--bits", default="16", help="weight_bits values, in order (e.g. 16,8,4)")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="kv_compression values")
    p.add_argument("--no-demo", action="store_true", help="skip the demo pair's quality and speed")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = p.parse_args()
    args.bits = [int(b) for b in args.bits.split(",")]
    args.ratios = [float(r) for r in args.ratios.split(",")]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        write_checkpoint(Path(tmp), {**LLAMA3_8B, "num_hidden_layers": args.layers}, seed=0)
        rows = capacity(Path(tmp), args)
    torch.cuda.empty_cache()
    native = rows[0]["native_per_token"]
    print(f"\n8B shape ({args.layers} layers), KV pool {args.kv_gib} GiB at 16 bits = {rows[0]['blocks']} "
          f"blocks, {args.requests} requests of {args.context} + {args.new_tokens} tokens; "
          f"native {native} B/token")
    print(f"{'bits':>5}{'r':>6}{'blocks':>8}{'most running':>14}{'vs first':>9}{'preempted':>11}"
          f"{'B/token':>10}{'achieved':>10}{'tokens/s':>10}{'wall s':>8}")
    for row in rows:
        print(f"{row['bits']:>5}{row['r']:>6}{row['blocks']:>8}{row['most']:>14}"
              f"{row['most'] / rows[0]['most']:>9.2f}{row['preempted']:>11}{row['bytes_per_token']:>10}"
              f"{row['achieved']:>10.3f}"
              f"{row['tokens_per_s']:>10.0f}{row['wall_s']:>8.1f}")
    if args.no_demo:
        return
    quality = demo_quality()
    print("\ndemo pair (bf16): probe vs the 16-bit cache, recall gain (nats), batch-16 decode tokens/s")
    print(f"{'r':>6}{'top1':>8}{'KL':>10}{'recall':>9}{'tok/s k=0':>11}{'tok/s k=4':>11}")
    for q in quality:
        print(f"{q['r']:>6}{q['top1']:>8.4f}{q['kl']:>10.5f}{q['recall_gain']:>9.2f}"
              f"{q['tokens_per_s']:>11.0f}{q['spec4_tokens_per_s']:>11.0f}")


if __name__ == "__main__":
    main()
