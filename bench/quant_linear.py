"""Quantized linear layers at decode on a GPU: the fused dequantizing kernels against copy bandwidth.

    python bench/quant_linear.py            # Llama-3-8B linear shapes at M = 1 and 16
    python bench/quant_linear.py --sweep    # also time other tile configs per case and print the best

For each Llama-3-8B linear (4096x4096 o_proj, 6144x4096 fused qkv, 28672x4096 fused gate_up, 4096x14336
down) and each row count: bf16 F.linear, int8 and int4 (group 128) through optd.kernels.quant_linear.
Each time is per call, from a CUDA graph replaying many calls that cycle over enough copies of the weight
to overflow L2 (each decode step reads every layer's weight once, from DRAM). Bytes = weight (packed
codes + scales + zeros) + x + output; GB/s over those bytes is compared with the device-to-device copy
bandwidth (bench/decode.py's copy_bandwidth, read + write). Rows "stream" time a kernel that reads the
int4 weight as the one-row GEMV does (same tiles, grid and pipelining) and does no arithmetic: the floor
of that access pattern. Before timing, each kernel's output is checked against quant_linear_ref on the
same inputs. The table comes last.
"""

import argparse
import itertools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from decode import copy_bandwidth, graph_seconds

from optd.kernels.quant_linear import (
    KernelConfig,
    default_config,
    packed_bytes,
    quant_linear_ref,
    quant_linear_triton,
    quantize_int4,
    quantize_int8,
)

SHAPES = {  # name: (out_features N, in_features K)
    "o_proj 4096x4096": (4096, 4096),
    "qkv 6144x4096": (6144, 4096),
    "gate_up 28672x4096": (28672, 4096),
    "down 4096x14336": (4096, 14336),
}
CALLS_PER_GRAPH = 64


def time_calls(fn, weights: list, x: torch.Tensor, reps: int = 10) -> float:
    """Seconds per call of fn(x, w), cycling over `weights`."""
    return graph_seconds(lambda i: fn(x, weights[i % len(weights)]), CALLS_PER_GRAPH, reps)


def copies_for(nbytes: int) -> int:
    """Copies of a weight that together overflow L2 four times over (at least 2)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, math.ceil(4 * l2 / nbytes))


def clone_q(qw):
    """A copy with its own storage (same values: speed does not depend on them)."""
    return type(qw)(**{f: (v.clone() if isinstance(v, torch.Tensor) else v) for f, v in vars(qw).items()})


def check(qw, x: torch.Tensor, config: KernelConfig | None = None) -> float:
    """Largest |kernel - reference|, relative to the reference's largest |value|."""
    got, want = quant_linear_triton(x, qw, config).float(), quant_linear_ref(x, qw).float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def sweep_configs(m: int, k: int, int4: bool) -> list[KernelConfig]:
    """At one row the CUDA-core GEMVs (weight rows x K tile, pipeline stages, warps, K splits); at 2..16
    rows, int4: the weight-left kernel (one or two warpgroups of 64 weight rows, pipeline stages, K
    splits), int8: the x-left tiles. K splits leave every program at least one K tile."""
    out = []
    if m == 1 and int4:
        tiles = [(8, 1024), (16, 1024), (16, 2048), (32, 1024), (32, 512), (64, 512)]
        for (bn, bk), warps, split in itertools.product(tiles, [1, 2, 4], [1, 2, 4]):
            if 4 <= bn * bk // (256 * warps) <= 64:  # int4 words per thread and tile
                out.append(KernelConfig(1, bn, bk, split, warps, 3))
    elif m == 1:
        for (bn, bk), split in itertools.product([(16, 256), (32, 256), (16, 512)], [1, 2]):
            out.append(KernelConfig(1, bn, bk, split, 4, 3))
        out += [KernelConfig(1, 16, 256, 1, 4, stages) for stages in (2, 4)]
    elif int4:
        for stages, split in itertools.product([2, 3, 4], [1, 2, 4]):
            out.append(KernelConfig(16, 64, 128, split, 4, stages, left=True, sxdot=True))
        out += [KernelConfig(16, 128, 128, split, 8, 3, left=True, sxdot=True) for split in (1, 2)]
    else:
        out += [KernelConfig(16, bn, 128, split, 4, 3) for bn, split in itertools.product([32, 64], [1, 4])]
    return [c for c in out if c.split_k == 1 or k // c.block_k >= c.split_k]


@triton.jit
def _stream_kernel(q_ptr, out_ptr, sqn, tiles_per_split, BLOCK_N: tl.constexpr, WK: tl.constexpr,
                   STAGES: tl.constexpr):
    """Reads int4 words as the one-row GEMV does (same tiles, grid and pipelining) and only XORs them."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_N, WK], dtype=tl.int32)
    t0 = tl.program_id(1) * tiles_per_split
    for t in tl.range(t0, t0 + tiles_per_split, num_stages=STAGES):
        kw = t * WK + tl.arange(0, WK)
        acc ^= tl.load(q_ptr + rn[:, None] * sqn + kw[None, :], eviction_policy="evict_first")
    tl.store(out_ptr + rn, tl.sum(acc, 1))


def stream_seconds(copies: list, cfg: KernelConfig) -> float:
    """The int4 GEMV's floor at one row: its weight reads alone, with its config (N and K whole tiles)."""
    n, kq = copies[0].q.shape
    wk = cfg.block_k // 8
    assert n % cfg.block_n == 0 and kq % (wk * cfg.split_k) == 0, f"{cfg} leaves partial tiles of {n}x{kq}"
    out = torch.empty(n, dtype=torch.int32, device="cuda")

    def read(x, qw):
        _stream_kernel[(n // cfg.block_n, cfg.split_k)](qw.q, out, qw.q.stride(0), kq // wk // cfg.split_k,
                                                         BLOCK_N=cfg.block_n, WK=wk, STAGES=cfg.num_stages,
                                                         num_warps=cfg.num_warps)
    return time_calls(read, copies, None)


def describe(cfg: KernelConfig) -> str:
    kind = (" left" + (" sxdot" if cfg.sxdot else "")) if cfg.left else ""
    tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
    return f"{tile} s{cfg.split_k} st{cfg.num_stages} w{cfg.num_warps}{kind}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16", help="row counts M (decode batch sizes)")
    p.add_argument("--sweep", action="store_true", help="time other tile configs too; print the best")
    p.add_argument("--shapes", default="o_proj,qkv,gate_up,down", help="which linears, by name")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    dtype = torch.bfloat16

    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"copy bandwidth (read+write): {bandwidth / 1e9:.0f} GB/s")
    g = torch.Generator(device="cuda").manual_seed(0)
    table = []
    wanted = args.shapes.split(",")
    for name, (n, k) in SHAPES.items():
        if name.split()[0] not in wanted:
            continue
        w = torch.randn(n, k, generator=g, device="cuda", dtype=dtype) * 0.02
        variants = {"bf16": (w, n * k * 2), "int8": (quantize_int8(w), 0), "int4": (quantize_int4(w), 0)}
        for m in rows:
            x = torch.randn(m, k, generator=g, device="cuda", dtype=dtype)
            io_bytes = (m * k + m * n) * 2
            base = None
            for fmt, (weight, wbytes) in variants.items():
                if fmt == "bf16":
                    copies = [weight] + [weight.clone() for _ in range(copies_for(wbytes) - 1)]
                    secs = time_calls(F.linear, copies, x)
                    err, cfg = 0.0, "cuBLAS"
                else:
                    wbytes = packed_bytes(weight)
                    copies = [weight] + [clone_q(weight) for _ in range(copies_for(wbytes) - 1)]
                    err = check(weight, x)
                    secs = time_calls(quant_linear_triton, copies, x)
                    default = best = default_config(m, n, k, weight, x.device)
                    if args.sweep:
                        secs, best = sweep(copies, x, m, k, fmt == "int4", secs, default, name)
                    cfg = describe(best)
                base = base or secs
                rate = (wbytes + io_bytes) / secs
                table.append((name, m, fmt, secs * 1e6, rate / 1e9, rate / bandwidth, base / secs, err, cfg))
                print(f"  {name} M={m} {fmt}: {secs * 1e6:.1f} us, {rate / 1e9:.0f} GB/s", flush=True)
                if fmt == "int4" and m == 1:  # what the weight reads alone take, the default's tiles
                    t = stream_seconds(copies, default)
                    table.append((name, m, "stream", t * 1e6, wbytes / t / 1e9, wbytes / t / bandwidth,
                                  base / t, 0.0, describe(default)))
                del copies
                torch.cuda.empty_cache()

    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; 'vs bf16' = F.linear time / this time; "
          "'max rel err' = max |kernel - quant_linear_ref| / max |ref|")
    print(f"{'linear':<20}{'M':>4}{'format':>8}{'us':>9}{'GB/s':>8}{'of copy':>9}{'vs bf16':>9}"
          f"{'max rel err':>13}  config")
    for name, m, fmt, us, gbs, frac, speedup, err, cfg in table:
        print(f"{name:<20}{m:>4}{fmt:>8}{us:>9.1f}{gbs:>8.0f}{frac:>9.2f}{speedup:>9.2f}{err:>13.1e}  {cfg}")


def sweep(copies: list, x: torch.Tensor, m: int, k: int, int4: bool, secs: float, cfg: KernelConfig,
          name: str):
    """The fastest of the default and the sweep's configs (each checked against the reference first)."""
    best = (secs, cfg)
    for c in sweep_configs(m, k, int4):
        try:
            if check(copies[0], x, c) > 2e-2:
                print(f"    {c}: WRONG RESULT", flush=True)
                continue
            t = time_calls(lambda x_, w_, c=c: quant_linear_triton(x_, w_, c), copies, x, reps=5)
        except Exception as e:  # e.g. out of shared memory at this tile size: report and go on
            print(f"    {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        print(f"    {name} M={m} {'int4' if int4 else 'int8'} {describe(c)}: {t * 1e6:.1f} us", flush=True)
        if t < best[0]:
            best = (t, c)
    fmt = "int4" if int4 else "int8"
    print(f"    {name} M={m} {fmt}: default {secs * 1e6:.1f} us, best {best[0] * 1e6:.1f} us with "
          f"{describe(best[1])}", flush=True)
    return best


if __name__ == "__main__":
    main()
