"""Linear layer over a weight-only quantized weight: y = x @ dequantize(w).T, dequantization fused.

`quant_linear_ref` is the plain-PyTorch definition of the op (and the CPU path of the engine);
`quant_linear_triton` runs the GPU kernels; `quant_linear` picks one by device. The formats, quantizers
and `dequantize` live in `optd.kernels.quantize` and are re-exported here.

Two kernel paths, both accumulating in float32 and never materializing the dequantized weight:
- decode (M <= 16 rows): memory-bound, so the aim is the weight bytes at copy bandwidth. One row runs
  as a GEMV on CUDA cores (codes turned into floats by bit tricks, scales and zero points applied once
  per group to partial sums, the next tile's bytes prefetched into registers); 2..16 rows run tl.dot
  with the rows padded to 16. K is split across
  programs when the output columns alone would leave the GPU underfilled; the float32 partial sums
  are added by a second small kernel (deterministic, unlike atomics).
- prefill (more rows): tiled tl.dot with grouped tile order for L2 reuse of the weight tiles.
Launch grids and workspaces depend on shapes only, so every launch is capturable in a CUDA graph. No
CUDA-only intrinsics: the same code compiles for ROCm.
"""

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from optd.kernels.quantize import (
    INT4_GROUP,
    Int4Weight,
    Int8Weight,
    dequantize,
    packed_bytes,
    quantize_int4,
    quantize_int8,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path must keep working without triton
    triton = None

__all__ = [
    "DECODE_MAX_ROWS",
    "INT4_GROUP",
    "Int4Weight",
    "Int8Weight",
    "KernelConfig",
    "default_config",
    "dequantize",
    "packed_bytes",
    "quant_linear",
    "quant_linear_ref",
    "quant_linear_triton",
    "quantize_int4",
    "quantize_int8",
]

# Rows up to which the decode (memory-bound) path runs; beyond, the prefill tiling.
DECODE_MAX_ROWS = 16


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters. block_m == 1 selects the GEMV kernel (one row only)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1  # programs along K; their float32 partial sums are added by a second kernel
    num_warps: int = 4
    num_stages: int = 3
    swizzle: int = 1  # tile rows per group of the grouped (L2-friendly) order; 1 = row-major


def _check(x: Tensor, qw: Int8Weight | Int4Weight) -> tuple[Tensor, int, int]:
    """x [..., K] as [M, K] (rows contiguous along K), plus N and K; clear errors on a mismatch."""
    if not isinstance(qw, Int8Weight | Int4Weight):
        raise ValueError(f"qw: expected an Int8Weight or Int4Weight, got {type(qw).__name__}")
    k = qw.k if isinstance(qw, Int4Weight) else qw.q.shape[1]
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != k:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected [..., {k}] (the weight's in_features), got {got}")
    if x.dtype != qw.scale.dtype:
        raise ValueError(f"x: dtype {x.dtype} differs from the weight's scale dtype {qw.scale.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2, qw.q.shape[0], k


def quant_linear_ref(x: Tensor, qw: Int8Weight | Int4Weight) -> Tensor:
    _check(x, qw)
    return F.linear(x, dequantize(qw))


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: no point splitting


def default_config(m: int, n: int, k: int, qw: Int8Weight | Int4Weight, device: torch.device) -> KernelConfig:
    """Tile shapes by row count, format and dtype; split-K on the decode path where the column tiles
    alone would give fewer than ~4 programs per SM. Not autotuned: an autotuner's first call syncs and
    benchmarks, which must not happen while a CUDA graph is being captured. bench/quant_linear.py
    --sweep measures alternatives. float32 tiles are smaller: its exact (non-tf32) dot runs on FMAs and
    spills registers at the 16-bit tile sizes."""
    int4 = isinstance(qw, Int4Weight)
    fp32 = qw.scale.dtype == torch.float32
    if m == 1:
        # From `bench/quant_linear.py --sweep` on an H100 (bench/RESULTS.md): long K tiles, one stage,
        # beat the pipelined 256-wide tiles by 10-25 % on the Llama-3-8B shapes.
        cfg = KernelConfig(1, 16, 512, num_warps=4, num_stages=1)
    elif m <= DECODE_MAX_ROWS:
        block_n = 64 if int4 and not fp32 else 32
        cfg = KernelConfig(16, block_n, 64 if fp32 else 128, num_warps=4, num_stages=4)
    elif fp32:
        return KernelConfig(32, 64, 32, num_warps=4, num_stages=3, swizzle=8)
    else:
        bm = 64 if m <= 64 else 128
        return KernelConfig(bm, 128, 64, num_warps=4 if bm == 64 else 8, num_stages=3, swizzle=8)
    if int4 and cfg.block_m > 1 and _pow2(qw.group) and qw.group >= 32:
        cfg = replace(cfg, block_k=min(cfg.block_k, qw.group))  # one group per tile: the fast path
    if m == 1 and device.type == "cuda":
        # The sweep's winners at one row: no split up to K = 8192 (o_proj, qkv, gate_up), a split of 2
        # with 32-wide column tiles for the long K of down_proj.
        return replace(cfg, block_n=32, split_k=2) if k > 8192 else cfg
    programs = -(-n // cfg.block_n)
    tiles = -(-k // cfg.block_k)
    return replace(cfg, split_k=max(1, min(-(-4 * _sm_count(device) // programs), tiles // 4, 16)))


if triton is not None:

    @triton.jit
    def _nibble_to_f32(v):
        """int32 v in 0..15 -> float32, exactly: v in the mantissa of 2^23, minus 2^23. Integer to float
        conversions run at a quarter of the FMA rate on NVIDIA GPUs; an OR and a subtract don't."""
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int8_to_f32(b):
        """int8 -> float32 by the same trick: the byte's bits XOR 0x80 are b + 128, put in the mantissa of
        2^23 (one three-input logic op), minus 2^23 + 128."""
        return ((b.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _gemv_int4_load(
        x_ptr, q_ptr, s_ptr, z_ptr, rn64, nmask, t, kend, kbend, NG, sqn, ssn, szn,
        GROUP: tl.constexpr, GK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Operands of K tile t for the grouped int4 GEMV, inputs at kend and beyond masked off (the tile
        past a split's last one loads nothing): the code bytes, x at even and odd k, and the scales and
        zeros of the tile's groups (GK = min(BLOCK_K, GROUP)). kbend = the bytes' end, kept a separate
        argument so that the compiler sees it is a multiple of 16 and vectorizes the masked loads."""
        k0 = t * BLOCK_K
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        bmask = nmask[:, None] & (kb < kbend)[None, :]
        # Weights are read once per call: don't let them push x, scales and zeros out of L2.
        b = tl.load(q_ptr + rn64[:, None] * sqn + kb[None, :], mask=bmask, other=0,
                    eviction_policy="evict_first")
        kk = k0 + tl.arange(0, BLOCK_K)
        # x contiguous (vector loads), then split into even and odd k.
        xe, xo = tl.split(tl.reshape(tl.load(x_ptr + kk, mask=kk < kend, other=0.0), [BLOCK_K // 2, 2]))
        # The tile covers whole groups or lies inside one: k0 // GROUP is its first group.
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GK)
        gmask = nmask[:, None] & (g < NG)[None, :]
        s = tl.load(s_ptr + rn64[:, None] * ssn + g[None, :], mask=gmask, other=0.0)
        z = tl.load(z_ptr + rn64[:, None] * szn + g[None, :], mask=gmask, other=0.0)
        return b, xe, xo, s, z

    @triton.jit
    def _gemv_int4_math(b, xe, xo, s, z, GK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """[BLOCK_N] float32 contribution of one tile: sum(q * x) per group, then
        scale * (sum(q * x) - zero * sum(x)): two multiplies per group instead of per element."""
        TPG: tl.constexpr = BLOCK_K // GK
        b = b.to(tl.int32)
        xe = xe.to(tl.float32)
        xo = xo.to(tl.float32)
        p = _nibble_to_f32(b & 0xF) * xe[None, :] + _nibble_to_f32(b >> 4) * xo[None, :]
        raw = tl.sum(tl.reshape(p, [BLOCK_N, TPG, GK // 2]), 2)
        sx = tl.sum(tl.reshape(xe + xo, [TPG, GK // 2]), 1)
        return tl.sum(s.to(tl.float32) * (raw - z.to(tl.float32) * sx[None, :]), 1)

    @triton.jit
    def _gemv_int4_gather_tile(
        x_ptr, q_ptr, s_ptr, z_ptr, rn64, nmask, k0, K, KB, sqn, ssn, szn,
        GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Any group size (the fallback): per-element scale and zero. [BLOCK_N] float32."""
        j = tl.arange(0, BLOCK_K // 2)
        kb = k0 // 2 + j
        bmask = nmask[:, None] & (kb < KB)[None, :]
        b = tl.load(q_ptr + rn64[:, None] * sqn + kb[None, :], mask=bmask, other=0).to(tl.int32)
        ke = k0 + 2 * j
        xe = tl.load(x_ptr + ke, mask=ke < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
        ge = ke // GROUP
        go = (ke + 1) // GROUP
        me = nmask[:, None] & (ke < K)[None, :]
        mo = nmask[:, None] & (ke + 1 < K)[None, :]
        se = tl.load(s_ptr + rn64[:, None] * ssn + ge[None, :], mask=me, other=0.0).to(tl.float32)
        ze = tl.load(z_ptr + rn64[:, None] * szn + ge[None, :], mask=me, other=0.0).to(tl.float32)
        so = tl.load(s_ptr + rn64[:, None] * ssn + go[None, :], mask=mo, other=0.0).to(tl.float32)
        zo = tl.load(z_ptr + rn64[:, None] * szn + go[None, :], mask=mo, other=0.0).to(tl.float32)
        we = (_nibble_to_f32(b & 0xF) - ze) * se
        wo = (_nibble_to_f32(b >> 4) - zo) * so
        return tl.sum(we * xe[None, :] + wo * xo[None, :], 1)

    @triton.jit
    def _gemv_int8_load(x_ptr, q_ptr, rn64, nmask, t, kend, sqn, BLOCK_K: tl.constexpr):
        kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = kk < kend
        b = tl.load(q_ptr + rn64[:, None] * sqn + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0,
                    eviction_policy="evict_first")
        xv = tl.load(x_ptr + kk, mask=kmask, other=0.0)
        return b, xv

    @triton.jit
    def _gemv_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, K, KB, NG, sqn, ssn, szn, sop, tiles_per_split,
        INT4: tl.constexpr, GROUP: tl.constexpr, GK: tl.constexpr, FAST: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One row of x against BLOCK_N rows of the weight, over this program's share of K.

        Memory-bound: the next tile's raw bytes are loaded before the current tile is computed (a
        register prefetch; Triton pipelines only loads that feed tl.dot), so each thread keeps two
        tiles' loads in flight."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rn64 = rn.to(tl.int64)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
        kend = tl.minimum(K, t1 * BLOCK_K)
        kbend = tl.minimum(KB, t1 * (BLOCK_K // 2))
        if INT4:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            if FAST:
                b, xe, xo, s, z = _gemv_int4_load(
                    x_ptr, q_ptr, s_ptr, z_ptr, rn64, nmask, t0, kend, kbend, NG, sqn, ssn, szn,
                    GROUP, GK, BLOCK_K)
                for t in range(t0, t1):
                    nb, nxe, nxo, ns, nz = _gemv_int4_load(
                        x_ptr, q_ptr, s_ptr, z_ptr, rn64, nmask, t + 1, kend, kbend, NG, sqn, ssn, szn,
                        GROUP, GK, BLOCK_K)
                    acc += _gemv_int4_math(b, xe, xo, s, z, GK, BLOCK_N, BLOCK_K)
                    b, xe, xo, s, z = nb, nxe, nxo, ns, nz
            else:
                for t in range(t0, t1):
                    acc += _gemv_int4_gather_tile(
                        x_ptr, q_ptr, s_ptr, z_ptr, rn64, nmask, t * BLOCK_K, K, KB, sqn, ssn, szn,
                        GROUP, BLOCK_K)
        else:
            # Products accumulate elementwise; one reduction at the end, one scale per output channel.
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            b, xv = _gemv_int8_load(x_ptr, q_ptr, rn64, nmask, t0, kend, sqn, BLOCK_K)
            for t in range(t0, t1):
                nb, nxv = _gemv_int8_load(x_ptr, q_ptr, rn64, nmask, t + 1, kend, sqn, BLOCK_K)
                acc2 += _int8_to_f32(b) * xv.to(tl.float32)[None, :]
                b, xv = nb, nxv
            s = tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            acc = tl.sum(acc2, 1) * s
        tl.store(out_ptr + pid_k * sop + rn, acc.to(out_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _gemm_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, KB, NG, sxm, sqn, ssn, szn, som, sop, tiles_per_split,
        INT4: tl.constexpr, GROUP: tl.constexpr, FAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """A BLOCK_M x BLOCK_N output tile over this program's share of K, through tl.dot."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: SWIZZLE consecutive row tiles sweep the column tiles together, so a weight
        # tile is read from DRAM once per group instead of once per row tile.
        width = SWIZZLE * num_n
        first_m = (pid // width) * SWIZZLE
        rows_here = tl.minimum(num_m - first_m, SWIZZLE)
        pid_m = first_m + (pid % width) % rows_here
        pid_n = (pid % width) // rows_here

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        xt = x_ptr.dtype.element_ty
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            if INT4:
                # Even and odd k as two half-depth products: no interleaving of the nibbles needed.
                j = tl.arange(0, BLOCK_K // 2)
                kb = k0 // 2 + j
                b = tl.load(q_ptr + rn64[:, None] * sqn + kb[None, :],
                            mask=nmask[:, None] & (kb < KB)[None, :], other=0).to(tl.int32)
                ke = k0 + 2 * j
                # x loaded contiguous (vector loads, pipelined), then split into even and odd k.
                kk = k0 + tl.arange(0, BLOCK_K)
                xmask = mmask[:, None] & (kk < K)[None, :]
                xv = tl.load(x_ptr + rm64[:, None] * sxm + kk[None, :], mask=xmask, other=0.0)
                xe, xo = tl.split(tl.reshape(xv, [BLOCK_M, BLOCK_K // 2, 2]))
                if UPCAST:  # the CPU interpreter would matmul bf16 as raw uint16 bits
                    xe = xe.to(tl.float32)
                    xo = xo.to(tl.float32)
                if FAST:  # the tile lies inside one group: one scale and zero per weight row
                    g = k0 // GROUP  # < NG: the tile starts inside K
                    s = tl.load(s_ptr + rn64 * ssn + g, mask=nmask, other=0.0).to(tl.float32)
                    z = tl.load(z_ptr + rn64 * szn + g, mask=nmask, other=0.0).to(tl.float32)
                    if BLOCK_M <= 16:
                        # Few rows (memory-bound): the codes, exact in any float type, go through the
                        # dot as they are; scale * (sum(q * x) - zero * sum(x)) per output afterwards.
                        lo = _nibble_to_f32(b & 0xF).to(xe.dtype)
                        hi = _nibble_to_f32(b >> 4).to(xe.dtype)
                        raw = tl.dot(xe, tl.trans(lo), input_precision="ieee")
                        raw = tl.dot(xo, tl.trans(hi), raw, input_precision="ieee")
                        sx = tl.sum(xe.to(tl.float32), 1) + tl.sum(xo.to(tl.float32), 1)
                        acc += s[None, :] * (raw - sx[:, None] * z[None, :])
                    else:
                        # Many rows (compute-bound): dequantize the tile once, accumulate in place (a
                        # second accumulator tile would spill registers).
                        we = ((_nibble_to_f32(b & 0xF) - z[:, None]) * s[:, None]).to(xt).to(xe.dtype)
                        wo = ((_nibble_to_f32(b >> 4) - z[:, None]) * s[:, None]).to(xt).to(xe.dtype)
                        acc = tl.dot(xe, tl.trans(we), acc, input_precision="ieee")
                        acc = tl.dot(xo, tl.trans(wo), acc, input_precision="ieee")
                else:
                    ge = ke // GROUP
                    go = (ke + 1) // GROUP
                    me = nmask[:, None] & (ke < K)[None, :]
                    mo = nmask[:, None] & (ke + 1 < K)[None, :]
                    se = tl.load(s_ptr + rn64[:, None] * ssn + ge[None, :], mask=me, other=0.0).to(tl.float32)
                    ze = tl.load(z_ptr + rn64[:, None] * szn + ge[None, :], mask=me, other=0.0).to(tl.float32)
                    so = tl.load(s_ptr + rn64[:, None] * ssn + go[None, :], mask=mo, other=0.0).to(tl.float32)
                    zo = tl.load(z_ptr + rn64[:, None] * szn + go[None, :], mask=mo, other=0.0).to(tl.float32)
                    # Dequantized weights rounded to the activations' dtype, as the reference rounds them.
                    we = ((_nibble_to_f32(b & 0xF) - ze) * se).to(xt).to(xe.dtype)
                    wo = ((_nibble_to_f32(b >> 4) - zo) * so).to(xt).to(xe.dtype)
                    acc = tl.dot(xe, tl.trans(we), acc, input_precision="ieee")
                    acc = tl.dot(xo, tl.trans(wo), acc, input_precision="ieee")
            else:
                kk = k0 + tl.arange(0, BLOCK_K)
                kmask = kk < K
                xv = tl.load(x_ptr + rm64[:, None] * sxm + kk[None, :], mask=mmask[:, None] & kmask[None, :],
                             other=0.0)
                b = tl.load(q_ptr + rn64[:, None] * sqn + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                            other=0)
                if UPCAST:
                    xv = xv.to(tl.float32)
                acc = tl.dot(xv, tl.trans(_int8_to_f32(b).to(xv.dtype)), acc, input_precision="ieee")  # exact
        if not INT4:
            s = tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            acc = acc * s[None, :]
        o = out_ptr + pid_k * sop + rm64[:, None] * som + rn[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = off < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(SPLIT):
            acc += tl.load(p_ptr + i * numel + off, mask=mask, other=0.0)
        tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_config(cfg: KernelConfig, m: int, int4: bool) -> None:
    for name in ("block_m", "block_n", "block_k"):
        assert _pow2(getattr(cfg, name)), f"{name} {getattr(cfg, name)} is not a power of 2"
    assert cfg.split_k >= 1 and cfg.swizzle >= 1, f"split_k and swizzle must be >= 1: {cfg}"
    if cfg.block_m == 1:
        assert m == 1, f"the GEMV kernel (block_m 1) takes one row, got {m}"
        assert cfg.block_k >= 2, "block_k must cover a byte of int4 codes"
    else:  # tl.dot wants every dimension >= 16
        depth = cfg.block_k // 2 if int4 else cfg.block_k
        assert cfg.block_m >= 16 and cfg.block_n >= 16 and depth >= 16, f"tile too small for tl.dot: {cfg}"


def quant_linear_triton(x: Tensor, qw: Int8Weight | Int4Weight, config: KernelConfig | None = None) -> Tensor:
    assert triton is not None, "quant_linear_triton needs triton; use quant_linear_ref"
    x2, n, k = _check(x, qw)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    int4 = isinstance(qw, Int4Weight)
    cfg = config or default_config(m, n, k, qw, x.device)
    _check_config(cfg, m, int4)
    q, s = qw.q, qw.scale
    assert q.stride(-1) == 1 and s.stride(-1) == 1, "codes and scales must be contiguous along K"
    z = qw.zero if int4 else s  # int8: unused placeholder
    group = qw.group if int4 else 1
    kb = q.shape[1]
    ng = s.shape[1] if int4 else 1
    # Grouped int4 fast paths: the GEMV takes tiles spanning whole power-of-two groups or lying inside
    # one; the dot kernel takes tiles inside one group. Other group sizes gather per element.
    fast = _pow2(group) and group >= (2 if cfg.block_m == 1 else cfg.block_k)
    # Whole K tiles per split; drop splits that would get none (shapes only: capturable).
    tiles = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(tiles, min(cfg.split_k, tiles))
    split = triton.cdiv(tiles, per_split)
    dst = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    sop = 0 if split == 1 else m * n
    sz = z.stride(0) if int4 else 0
    ss = s.stride(0) if int4 else 0
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.block_m == 1:
        _gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
            x2, q, s, z, dst, n, k, kb, ng, q.stride(0), ss, sz, sop, per_split,
            INT4=int4, GROUP=group, GK=min(group, cfg.block_k), FAST=fast, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, **launch,
        )
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        _gemm_kernel[grid](
            x2, q, s, z, dst, m, n, k, kb, ng, x2.stride(0), q.stride(0), ss, sz, n, sop, per_split,
            INT4=int4, GROUP=group, FAST=fast, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SWIZZLE=cfg.swizzle, UPCAST=x.device.type == "cpu" and x.dtype != torch.float32, **launch,
        )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](dst, out, m * n, SPLIT=split, BLOCK=block)
    return out.view(*x.shape[:-1], n)


def quant_linear(x: Tensor, qw: Int8Weight | Int4Weight) -> Tensor:
    # ROCm builds of torch report their GPUs as device type "cuda" too.
    if x.device.type == "cuda" and triton is not None:
        return quant_linear_triton(x, qw)
    return quant_linear_ref(x, qw)
