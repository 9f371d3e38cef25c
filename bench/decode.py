"""Decode speed on a GPU: optd against the memory-bandwidth limit and against transformers, one run.

    python bench/decode.py                      # Llama-3-8B shape, random bf16 weights
    python bench/decode.py --layers 4 --no-hf   # a quick check

Prints the device-to-device copy bandwidth (bytes read + written per second), then optd's decode
tokens/s at each batch size with the bytes a decode step must read (weights + KV of the context)
and the fraction of the copy bandwidth that achieves, then transformers' generate on the same
weights and prompt. Weights are random (normal, std 0.02): speed does not depend on their values.
"""

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from optd.engine import Engine, EngineConfig, SamplingParams
from optd.engine.loader import BUNDLED

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, model_type="llama",
                 architectures=["LlamaForCausalLM"], hidden_act="silu", bos_token_id=0, eos_token_id=0,
                 torch_dtype="bfloat16")


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)  # read + write


def graph_seconds(call, calls: int, reps: int = 10) -> float:
    """Seconds per call of call(i), i in range(calls), from replays of one CUDA graph holding all the
    calls (no launch gaps from Python; the engine's decode steps are graphs too). Callers cycle over
    enough copies of their inputs that the data comes from DRAM, as in a decode step."""
    for i in range(2):  # compile / warm up outside the capture
        call(i)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def write_checkpoint(folder: Path, config: dict, seed: int) -> None:
    """Random bf16 weights in Hugging Face names, one shard per few layers, with an index."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D = H // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * D

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()

    weight_map, shard = {}, {}

    total_bytes = 0

    def flush(name: str) -> None:
        nonlocal total_bytes
        total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    shard["model.embed_tokens.weight"] = rand(V, H)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (kv, H)),
                            ("self_attn.v_proj", (kv, H)), ("self_attn.o_proj", (H, H)),
                            ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)), ("mlp.down_proj", (H, I))]:
            shard[p + name + ".weight"] = rand(*shape)
        shard[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        shard[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        if i % 8 == 7:
            flush(f"model-{i // 8:05d}.safetensors")
    shard["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    shard["lm_head.weight"] = rand(V, H)
    flush("model-last.safetensors")
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    # Any tokenizer.json loads; prompts are token ids.
    (folder / "tokenizer.json").write_bytes((BUNDLED["demo"] / "tokenizer.json").read_bytes())


def decode_rate(outputs) -> float:
    """Generated tokens per second of the decode phase (after the last prompt's first token)."""
    last_first_token = max(o.ttft_s for o in outputs)
    end = max(o.e2e_s for o in outputs)
    return sum(len(o.token_ids) - 1 for o in outputs) / (end - last_first_token)


def optd_runs(folder: Path, args) -> tuple[list[dict], int]:
    """Decode rates at each weight_bits and batch; each switch is timed with a request streaming."""
    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(model=str(folder), max_model_len=args.context + args.new_tokens + 16,
                          max_num_seqs=max(batches), max_num_batched_tokens=8192)
    rows = []
    with Engine(config) as engine:
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
        g = torch.Generator().manual_seed(0)
        for bits in (int(b) for b in args.bits.split(",")):
            switch_s = None
            if bits != engine.knobs.weight_bits:
                stream = threading.Thread(target=engine.generate, args=(
                    [list(range(1, 65))], SamplingParams(max_tokens=2000, ignore_eos=True)))
                stream.start()
                outcome = engine.apply(weight_bits=bits)["weight_bits"]
                assert outcome.status == "applied", outcome
                switch_s = outcome.cost_s
                stream.join()
            for b in batches:
                prompts = torch.randint(1, LLAMA3_8B["vocab_size"], (b, args.context), generator=g).tolist()
                engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
                rate = decode_rate(engine.generate(prompts, params))
                # Bytes a step reads: the linear weights as stored now (embedding rows are a gather).
                rows.append({"bits": bits, "batch": b, "tokens_per_s": rate, "switch_s": switch_s,
                             "weight_bytes": engine.weight_bytes})
                switch_s = None
        return rows, engine.pool.layout.bytes_per_token


def _timed_generate(model, ids: torch.Tensor, n: int, kwargs: dict) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def hf_run(folder: Path, args, prompt: list[int]) -> dict:
    """transformers' decode rate: its fast path (a static cache, which generate() compiles with
    torch.compile in reduce-overhead mode on CUDA), then its default (dynamic cache, eager)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
    ids, n = torch.tensor([prompt], device="cuda"), args.new_tokens
    result = {}
    for mode, kwargs in (("static+compile", {"cache_implementation": "static"}), ("eager", {})):
        try:
            _timed_generate(model, ids, n, kwargs)  # warm-up (compiles)
            _timed_generate(model, ids, n, kwargs)
            full, first = _timed_generate(model, ids, n, kwargs), _timed_generate(model, ids, 1, kwargs)
            result[mode] = (n - 1) / (full - first)
        except Exception as e:  # report what did not work instead of hiding it
            result[mode] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return result


def check_against_transformers() -> str:
    """Greedy tokens of the demo model through the measured path (bf16, CUDA graphs) vs transformers."""
    import transformers

    prompts = ["def fib(n):", "import os\n\nclass ", "for i in range(", "    def __init__(self"]
    with Engine(EngineConfig(model="demo", max_num_seqs=8)) as engine:
        ours = engine.generate(prompts, SamplingParams(max_tokens=48, ignore_eos=True))
        ids = [o.prompt_token_ids for o in ours]
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED["demo"], dtype=torch.bfloat16,
                                                              device_map="cuda")
    model.generation_config.eos_token_id = None
    same = total = 0
    for o, prompt in zip(ours, ids, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        # An explicit mask: the demo's BOS id is also its pad id, which transformers would mask out.
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
        ref = ref[0, len(prompt):].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(o.token_ids, ref, strict=True)) if a != b), 48)
        same, total = same + agree, total + 48
    return f"demo model, greedy, bf16: {same}/{total} tokens agree with transformers before a divergence"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--bits", default="16", help="weight_bits values to measure, in order (e.g. 16,8,4)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = p.parse_args()
    config = {**LLAMA3_8B, "num_hidden_layers": args.layers}

    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"copy bandwidth (read+write): {bandwidth / 1e9:.0f} GB/s")
    print(check_against_transformers())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        write_checkpoint(folder, config, seed=0)
        print(f"checkpoint written in {time.perf_counter() - t:.0f} s")
        rows, kv_per_token = optd_runs(folder, args)
        torch.cuda.empty_cache()
        ctx = args.context + args.new_tokens / 2  # mean context over the decode
        print(f"\nKV per context token: {kv_per_token} B; a step reads the linear weights as stored + KV")
        print(f"{'engine':<24}{'bits':>5}{'batch':>6}{'tokens/s':>12}{'GB read':>9}{'GB/s read':>11}"
              f"{'of copy bw':>12}{'vs 16-bit':>10}{'switch s':>10}")
        base = {r["batch"]: r["tokens_per_s"] for r in rows if r["bits"] == 16}
        for r in rows:
            step_bytes = r["weight_bytes"] + r["batch"] * ctx * kv_per_token
            achieved = step_bytes * r["tokens_per_s"] / r["batch"]
            speedup = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
            switch = f"{r['switch_s']:.1f}" if r["switch_s"] is not None else "-"
            print(f"{'optd':<24}{r['bits']:>5}{r['batch']:>6}{r['tokens_per_s']:>12.1f}"
                  f"{r['weight_bytes'] / 1e9:>9.2f}{achieved / 1e9:>11.0f}{achieved / bandwidth:>12.2f}"
                  f"{speedup:>10.2f}{switch:>10}")
        if args.no_hf:
            return
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(1, LLAMA3_8B["vocab_size"], (args.context,), generator=g).tolist()
        for mode, rate in hf_run(folder, args, prompt).items():
            if isinstance(rate, float):
                ratio = rows[0]["tokens_per_s"] / rate
                print(f"{'transformers ' + mode:<24}{1:>6}{rate:>12.1f}   optd batch 1 / this = {ratio:.2f}")
            else:
                print(f"transformers {mode}: {rate}")


if __name__ == "__main__":
    main()
