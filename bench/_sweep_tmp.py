"""EXPERIMENT (not committed): int4 GEMV ceiling and wider sweep on the big shapes."""
import itertools, sys
import torch, triton, triton.language as tl
from decode import copy_bandwidth
from quant_linear import SHAPES, check, clone_q, copies_for, time_calls
from optd.kernels.quant_linear import KernelConfig, default_config, packed_bytes, quant_linear_triton, quantize_int4

@triton.jit
def _read_kernel(q_ptr, out_ptr, KQ, sqn, tiles_per_split, BLOCK_N: tl.constexpr, WK: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0); pid_k = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_N, WK], dtype=tl.int32)
    t0 = pid_k * tiles_per_split
    for t in tl.range(t0, t0 + tiles_per_split, num_stages=STAGES):
        kw = t * WK + tl.arange(0, WK)
        acc ^= tl.load(q_ptr + rn[:, None] * sqn + kw[None, :], eviction_policy="evict_first")
    tl.store(out_ptr + pid_n * BLOCK_N + tl.arange(0, BLOCK_N) + pid_k * 0, tl.sum(acc, 1))

def read_only(copies, n, bn, bk, split, warps, stages):
    kq = copies[0].q.shape[1]; wk = bk // 8
    tiles = kq // wk; per = tiles // split
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    def fn(x, w):
        _read_kernel[(n // bn, split)](w.q, out, kq, w.q.stride(0), per, BLOCK_N=bn, WK=wk, STAGES=stages, num_warps=warps)
    return time_calls(fn, copies, None)

bw = copy_bandwidth()
print(f"copy {bw/1e9:.0f} GB/s")
g = torch.Generator(device="cuda").manual_seed(0)
rows = []
for name in sys.argv[1].split(","):
    n, k = [v for key, v in SHAPES.items() if key.startswith(name)][0]
    w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    qw = quantize_int4(w); nbytes = packed_bytes(qw)
    copies = [qw] + [clone_q(qw) for _ in range(copies_for(nbytes) - 1)]
    x = torch.randn(1, k, generator=g, device="cuda", dtype=torch.bfloat16)
    d = default_config(1, n, k, qw, x.device)
    t = time_calls(quant_linear_triton, copies, x)
    rows.append((name, "default", str(d), t))
    for bn, bk, split, warps, stages in [][:0] and [(64, 512, d.split_k, 4, 3), (64, 512, d.split_k, 4, 4), (64, 512, 2 * d.split_k, 4, 3), (128, 512, d.split_k, 8, 3), (32, 512, d.split_k, 4, 3)]:
        try:
            rows.append((name, "read-only", f"{bn}x{bk} s{split} w{warps} st{stages}", read_only(copies, n, bn, bk, split, warps, stages)))
        except Exception as e:
            print("read-only fail", e)
    cfgs = []
    for bn, bk, warps, split in itertools.product([8, 16, 32], [512, 1024, 2048], [1, 2, 4], [1, 2, 4, 8]):
        if bn * bk // 8 // (32 * warps) < 4 or bn * bk // 8 // (32 * warps) > 64:
            continue  # words per thread per tile
        cfgs.append(KernelConfig(1, bn, bk, split, warps, 3))
    for c in cfgs:
        if (k // c.block_k) < c.split_k: continue
        try:
            if check(copies[0], x, c) > 2e-2:
                print("WRONG", c); continue
            tt = time_calls(lambda x_, w_, c=c: quant_linear_triton(x_, w_, c), copies, x, reps=5)
        except Exception as e:
            print("fail", c, str(e)[:100]); continue
        rows.append((name, "sweep", f"{c.block_n}x{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}", tt))
    for r in sorted([r for r in rows if r[0] == name], key=lambda r: r[3])[:8] + [r for r in rows if r[0] == name and r[1] == "default"]:
        if r[0] == name:
            print(f"{r[0]:<8} {r[1]:<10} {r[2]:<28} {r[3]*1e6:7.1f} us {nbytes/r[3]/bw:5.2f} of copy")
