"""Linear layer over a weight-only quantized weight: y = x @ dequantize(w).T, dequantization fused.

`quant_linear_ref` is the plain-PyTorch definition of the op (and the CPU path of the engine);
`quant_linear_triton` runs the GPU kernels; `quant_linear` picks one by device. The formats, quantizers
and `dequantize` live in `optd.kernels.quantize` and are re-exported here.

Kernels, all accumulating in float32 and never materializing the dequantized weight:
- one row (GEMVs, `_gemv_int4_kernel`, `_gemv_int8_kernel`): CUDA cores, weight tiles pipelined
  through shared memory. int4 codes become floats with one shift and one logic op each, read in the
  words' order with x loaded to match (no exchange between threads); scales and zero points are applied
  once per group to partial sums. int8 products accumulate elementwise.
- int4 at 2..16 rows, power-of-two groups (`_decode_int4_kernel`): the weight tile is the left operand
  of the product and x^T (rows padded to 16) the right one, so on a Hopper GPU 64 weight rows run as
  warpgroup MMAs with the weight in registers. Codes become 16-bit floats (128 + q in bf16, 1024 + q in
  fp16) with one shift and one logic op per two codes, thanks to the word layout
  (optd.kernels.quantize); offset and zero point are removed per group after the product:
  scale * (sum((128 + q) x) - (128 + zero) * sum(x)).
- x-left tiles (`_gemm_kernel`): int8 at 2..16 rows (codes converted exactly, cp.async-pipelined by
  Triton), int4 groups of other sizes, and prefill (many rows, compute-bound: weights dequantized in
  registers, grouped tile order for L2 reuse of the weight tiles).
Where the output tiles alone would leave the GPU underfilled, K is split across programs; the last
program of an output tile to finish adds the float32 partial sums in a fixed order (deterministic, one
launch), found through a per-tile arrival counter that it resets for the next launch. Launch grids and
workspaces depend on shapes only, so every launch is capturable in a CUDA graph. No CUDA-only
intrinsics: the same code compiles for ROCm.
"""

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from optd.kernels.activation import silu_and_mul, silu_and_mul_ref
from optd.kernels.pdl import pdl_options
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

    from optd.kernels.pdl import pdl_wait
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

# Rows up to which the decode (memory-bound) configs apply; beyond, the prefill tiling.
DECODE_MAX_ROWS = 16
# Split-K arrival counters per device: one per output tile of a launch, zero between launches.
MAX_SPLIT_TILES = 1 << 16


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters. block_m == 1: the GEMV (one row); left: the int4 decode kernel
    (weight as the left operand, up to block_m = 16 rows); otherwise the x-left tiles."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1  # programs along K (block_m <= 16); the last one adds the partial sums
    num_warps: int = 4
    num_stages: int = 3
    swizzle: int = 1  # tile rows per group of the grouped (L2-friendly) order; 1 = row-major
    left: bool = False
    sxdot: bool = False  # left: sum(x) per group through the tensor cores (ones @ x^T)


def _check(x: Tensor, qw: Int8Weight | Int4Weight, swiglu: bool = False) -> tuple[Tensor, int, int]:
    """x [..., K] (swiglu: [..., 2K], gate then up) as [M, K or 2K] (rows contiguous), plus N and K;
    clear errors on a mismatch."""
    if not isinstance(qw, Int8Weight | Int4Weight):
        raise ValueError(f"qw: expected an Int8Weight or Int4Weight, got {type(qw).__name__}")
    k = qw.k if isinstance(qw, Int4Weight) else qw.q.shape[1]
    width = 2 * k if swiglu else k
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != width:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        what = "twice the weight's in_features (gate | up)" if swiglu else "the weight's in_features"
        raise ValueError(f"x: expected [..., {width}] ({what}), got {got}")
    if x.dtype != qw.scale.dtype:
        raise ValueError(f"x: dtype {x.dtype} differs from the weight's scale dtype {qw.scale.dtype}")
    x2 = x.reshape(-1, width)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2, qw.q.shape[0], k


def quant_linear_ref(x: Tensor, qw: Int8Weight | Int4Weight, swiglu: bool = False) -> Tensor:
    """x @ dequantize(qw).T; swiglu: silu(gate) * up of x = [gate | up] first."""
    _check(x, qw, swiglu)
    return F.linear(silu_and_mul_ref(x) if swiglu else x, dequantize(qw))


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: no point splitting


_counters: dict[torch.device, Tensor] = {}


def _split_counters(device: torch.device) -> Tensor:
    """The device's arrival counters. Allocated zeroed once (a launch leaves them at zero), kept for the
    process: a CUDA graph bakes in their address. Launches that overlap on concurrent streams would
    share them, which the engine (one stream) never does."""
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return c


def _int4_fast(qw: Int4Weight, block_k: int) -> bool:
    """Tiles of block_k inputs lie inside one group: one scale and zero per weight row and tile."""
    return _pow2(qw.group) and qw.group >= block_k


def _fill(programs: int, tiles: int, device: torch.device, per_sm: int) -> int:
    """A K split giving at most per_sm programs per SM (those that fit at once: no second wave), each
    with at least one K tile."""
    return max(1, min(per_sm * _sm_count(device) // programs, tiles, 16))


def default_config(m: int, n: int, k: int, qw: Int8Weight | Int4Weight, device: torch.device) -> KernelConfig:
    """Tile shapes by row count, format and dtype, from `bench/quant_linear.py --sweep` on an H100
    (bench/RESULTS.md); split-K on the decode paths where the output tiles alone would leave the GPU
    underfilled. Not autotuned: an autotuner's first call syncs and benchmarks, which must not happen
    while a CUDA graph is being captured. float32 tiles are smaller: its exact (non-tf32) dot runs on
    FMAs and spills registers at the 16-bit tile sizes."""
    int4 = isinstance(qw, Int4Weight)
    fp32 = qw.scale.dtype == torch.float32
    if m > DECODE_MAX_ROWS:
        if fp32:
            cfg = KernelConfig(32, 64, 32, num_warps=4, num_stages=3, swizzle=8)
        else:
            bm = 64 if m <= 64 else 128
            cfg = KernelConfig(bm, 128, 64, num_warps=4 if bm == 64 else 8, num_stages=3, swizzle=8)
        if int4 and _pow2(qw.group) and qw.group >= 16:
            cfg = replace(cfg, block_k=min(cfg.block_k, qw.group))  # one group per tile: the fast path
        return cfg
    grouped = int4 and _pow2(qw.group) and qw.group >= 16  # whole groups or one group per tile
    if fp32:  # exact float32 products on FMAs: small tiles, no speed to chase
        cfg = KernelConfig(16, 32, 32, num_stages=2)
        return replace(cfg, block_k=min(32, qw.group)) if grouped else cfg
    if m == 1 and (grouped or not int4):
        # CUDA cores, weight tiles pipelined through shared memory (the sweep's fastest on the Llama-3-8B
        # shapes). int4: 16 rows by 1024 inputs (2048 past 8192), two warps for the long gate_up, and so
        # many programs that the GPU is full without splitting K except on small models; int8: 16 rows by
        # 512 inputs (256 past 8192 rows), no split.
        if int4:
            bk = min(2048 if k > 8192 else 1024, max(64, triton.next_power_of_2(k)))  # no tile mostly past K
            cfg = KernelConfig(1, 16, bk, num_warps=2 if n > 16384 else 4, num_stages=3)
            return replace(cfg, split_k=_fill(-(-n // 16), -(-k // bk), device, 1))
        return KernelConfig(1, 16, 512 if n <= 8192 else 256, num_stages=3)
    if grouped:  # 64 weight rows (one warpgroup) by one group
        cfg = KernelConfig(16, 64, min(128, qw.group), num_stages=3, left=True, sxdot=True)
        return replace(cfg, split_k=_fill(-(-n // 64), -(-k // cfg.block_k), device, 3))
    if int4:  # other group sizes: per-element scales
        return replace(KernelConfig(16, 32, 64), split_k=_fill(-(-n // 32), -(-k // 64), device, 4))
    cfg = KernelConfig(16, 32, 128, num_stages=3)
    return replace(cfg, split_k=_fill(-(-n // 32), -(-k // 128), device, 6))


if triton is not None:

    @triton.jit
    def _int8_to_f32(b):
        """int8 -> float32 exactly: the byte's bits XOR 0x80 are b + 128, put in the mantissa of 2^23 (one
        three-input logic op), minus 2^23 + 128. Integer to float conversions run at a quarter of the FMA
        rate on NVIDIA GPUs; a logic op and a subtract don't."""
        return ((b.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _half(t, HALF: tl.constexpr):
        """The low 16 bits of int32 t as the 16-bit float type (bf16, or fp16 when HALF)."""
        return t.to(tl.int16).to(tl.float16 if HALF else tl.bfloat16, bitcast=True)

    @triton.jit
    def _unpack_int4(w, orc, HALF: tl.constexpr, BN: tl.constexpr, KW: tl.constexpr):
        """int32 words [BN, KW] -> [BN, 8 KW] 16-bit floats OFFSET + code, in k order (OFFSET = 128 for
        bf16, 1024 for fp16: the codes land in the mantissa of that power of two). `orc` holds the
        exponent bits in both halves; a runtime value, so that AND and OR fuse into one logic op."""
        t0 = (w & 0x000F000F) | orc  # halves: k = 8j, 8j + 1
        t1 = ((w >> 4) & 0x000F000F) | orc  # k = 8j + 2, 8j + 3
        t2 = ((w >> 8) & 0x000F000F) | orc
        t3 = ((w >> 12) & 0x000F000F) | orc
        p0 = tl.join(_half(t0, HALF), _half(t0 >> 16, HALF))  # [BN, KW, 2 (parity)]
        p1 = tl.join(_half(t1, HALF), _half(t1 >> 16, HALF))
        p2 = tl.join(_half(t2, HALF), _half(t2 >> 16, HALF))
        p3 = tl.join(_half(t3, HALF), _half(t3 >> 16, HALF))
        q = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # [BN, KW, parity, j1, j2], pair m = 2 j1 + j2
        # k - 8j = 2m + parity: parity innermost. Each register then holds two consecutive k, as built.
        return tl.reshape(tl.permute(q, (0, 1, 3, 4, 2)), [BN, KW * 8])

    @triton.jit
    def _load_w(q_ptr, s_ptr, z_ptr, rn64, nmask, t, kwend, NG, sqn, ssn, szn,
                INT4: tl.constexpr, FAST: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """The weight operands of K tile t, codes at kwend (in words or bytes) and beyond masked off:
        codes, and for the grouped int4 tiles the scale and zero of the tile's group per row."""
        WK: tl.constexpr = BLOCK_K // 8 if INT4 else BLOCK_K  # int32 words or int8 bytes
        kw = t * WK + tl.arange(0, WK)
        # Weights are read once per call: don't let them push x, scales and zeros out of L2.
        w = tl.load(q_ptr + rn64[:, None] * sqn + kw[None, :], mask=nmask[:, None] & (kw < kwend)[None, :],
                    other=0, eviction_policy="evict_first")
        if INT4 and FAST:
            g = tl.minimum((t * BLOCK_K) // GROUP, NG - 1)  # in bounds (values past the end unused)
            s = tl.load(s_ptr + rn64 * ssn + g, mask=nmask, other=0.0)
            z = tl.load(z_ptr + rn64 * szn + g, mask=nmask, other=0.0)
        else:
            s = 0.0
            z = 0.0
        return w, s, z

    @triton.jit
    def _load_xt(x_ptr, rm, mmask, t, kend, sxm, BLOCK_K: tl.constexpr):
        """x^T [BLOCK_K, BLOCK_M] of K tile t, inputs at kend and beyond masked off."""
        kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        return tl.load(x_ptr + rm[None, :] * sxm + kk[:, None], mask=mmask[None, :] & (kk < kend)[:, None],
                       other=0.0)

    @triton.jit
    def _dequant_int4_gather(w, orc, s_ptr, z_ptr, rn64, nmask, k0, K, ssn, szn, xt,
                             OFFSET: tl.constexpr, HALF: tl.constexpr, GROUP: tl.constexpr,
                             BN: tl.constexpr, BLOCK_K: tl.constexpr):
        """Any group size (the fallback): [BN, BLOCK_K] weights with per-element scale and zero, rounded
        to the activations' dtype as the reference rounds them."""
        v = _unpack_int4(w, orc, HALF, BN, BLOCK_K // 8).to(tl.float32)
        kk = k0 + tl.arange(0, BLOCK_K)
        g = kk // GROUP
        m = nmask[:, None] & (kk < K)[None, :]
        s = tl.load(s_ptr + rn64[:, None] * ssn + g[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn64[:, None] * szn + g[None, :], mask=m, other=0.0).to(tl.float32)
        return ((v - (z + OFFSET)) * s).to(xt)

    @triton.jit
    def _mm(a, b, acc, UPCAST: tl.constexpr):
        if UPCAST:  # the CPU interpreter would matmul bf16 as raw uint16 bits
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision="ieee")  # ieee: exact float32 if x is float32

    @triton.jit
    def _store_out(acc, out_ptr, ws_ptr, cnt_ptr, offs, omask, part, pid_k, tile, split, SPLIT: tl.constexpr):
        """The output tile, or (SPLIT) this program's float32 partial sums to the workspace; the last
        program of the output tile to arrive adds them in split order (the same bits whichever arrives
        last) and resets the tile's arrival counter for the next launch."""
        if not SPLIT:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(ws_ptr + pid_k * part + offs, acc, mask=omask)
            tl.debug_barrier()  # every thread's partial issued before the arrival is published
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == split - 1:
                total = tl.zeros(acc.shape, dtype=tl.float32)
                for i in range(split):
                    # .cg: from L2, where the other programs' stores are, never a stale L1 line.
                    total += tl.load(ws_ptr + i * part + offs, mask=omask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _int4_group(acc, w, s, z, xv, orc, OFFSET: tl.constexpr, HALF: tl.constexpr, UPCAST: tl.constexpr,
                    SXDOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc [BLOCK_N, BLOCK_M] += one K tile inside one group: scale * (sum((OFFSET + q) x) -
        (OFFSET + zero) * sum(x))."""
        xt = xv.dtype
        wv = _unpack_int4(w, orc, HALF, BLOCK_N, BLOCK_K // 8)  # OFFSET + q, exact
        if xt == tl.float32:  # exact codes: no cancellation of OFFSET * sum(x) at full precision
            raw = tl.dot(wv.to(tl.float32) - OFFSET, xv, input_precision="ieee")
            zo = z.to(tl.float32)
        else:
            raw = _mm(wv, xv, tl.zeros(acc.shape, tl.float32), UPCAST)
            zo = z.to(tl.float32) + OFFSET
        if SXDOT and not UPCAST and xt != tl.float32:
            # sum(x) per column on the tensor cores, already in the accumulator's layout
            sx = tl.dot(tl.full([BLOCK_N, BLOCK_K], 1.0, xt), xv)
        else:
            sx = tl.sum(xv.to(tl.float32), 0)[None, :]
        return acc + s.to(tl.float32)[:, None] * (raw - zo[:, None] * sx)

    @triton.jit
    def _decode_int4_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, KQ, NG, sxm, sqn, ssn, szn, som, tiles_per_split, split, orc,
        GROUP: tl.constexpr, OFFSET: tl.constexpr, HALF: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT: tl.constexpr, SXDOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K share] @ x^T [K share, BLOCK_M] over this program's
        share of K, grouped int4 (BLOCK_K inside one group), then (SPLIT) the partial sums' fixed-order
        reduction by the last program. Triton pipelines the operand loads through shared memory (STAGES
        tiles in flight)."""
        pdl_wait(PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        nmask = rn < N
        mmask = rm < M
        rn64 = rn.to(tl.int64)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
        kwend = tl.minimum(KQ, t1 * (BLOCK_K // 8))
        kend = tl.minimum(K, t1 * BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for t in tl.range(t0, t1, num_stages=STAGES):
            w, s, z = _load_w(q_ptr, s_ptr, z_ptr, rn64, nmask, t, kwend, NG, sqn, ssn, szn,
                              True, True, GROUP, BLOCK_K)
            xv = _load_xt(x_ptr, rm, mmask, t, kend, sxm, BLOCK_K)
            acc = _int4_group(acc, w, s, z, xv, orc, OFFSET, HALF, UPCAST, SXDOT, BLOCK_N, BLOCK_K)
        offs = rm[None, :] * som + rn[:, None]
        _store_out(acc, out_ptr, ws_ptr, cnt_ptr, offs, nmask[:, None] & mmask[None, :], M * N, pid_k, pid_n,
                   split, SPLIT)

    @triton.jit
    def _gemm_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, KQ, NG, sxm, sqn, ssn, szn, som, tiles_per_split, split, orc,
        INT4: tl.constexpr, GROUP: tl.constexpr, FAST: tl.constexpr, OFFSET: tl.constexpr,
        HALF: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """A BLOCK_M x BLOCK_N output tile over this program's share of K through tl.dot, x the left
        operand, weights dequantized in registers (int4 rounded to the activations' dtype, as the
        reference rounds them; int8 codes exact, the scale applied at the end)."""
        pdl_wait(PDL)
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
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + rm64[:, None] * sxm + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :],
                         other=0.0)
            w, s, z = _load_w(q_ptr, s_ptr, z_ptr, rn64, nmask, t, KQ, NG, sqn, ssn, szn,
                              INT4, FAST, GROUP, BLOCK_K)
            if INT4:
                if FAST:  # the tile lies inside one group: one scale and zero per weight row
                    v = _unpack_int4(w, orc, HALF, BLOCK_N, BLOCK_K // 8).to(tl.float32)
                    zo = z.to(tl.float32) + OFFSET
                    wd = ((v - zo[:, None]) * s.to(tl.float32)[:, None]).to(xt)
                else:
                    wd = _dequant_int4_gather(w, orc, s_ptr, z_ptr, rn64, nmask, k0, K, ssn, szn, xt,
                                              OFFSET, HALF, GROUP, BLOCK_N, BLOCK_K)
            else:
                wd = _int8_to_f32(w).to(xt)  # exact
            acc = _mm(xv, tl.trans(wd), acc, UPCAST)
        if not INT4:
            acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        offs = rm64[:, None] * som + rn[None, :]
        _store_out(acc, out_ptr, ws_ptr, cnt_ptr, offs, mmask[:, None] & nmask[None, :], M * N, pid_k, pid,
                   split, SPLIT)

    @triton.jit
    def _gemv_nibble(part, sxs, v, magic, x, POS: tl.constexpr, EXACT: tl.constexpr):
        """part += code * x' for the nibble of words v at bits POS..POS+3 (8, 12 or 16) and its inputs x.
        With `magic` = 0x43000000 (128.0) the masked word is the float 128 + q 2^(POS-16), one logic op,
        so with x' = 2^(16-POS) x (exact) the product is 128 x' + q x. EXACT (float32 activations, where
        that offset would cost precision): `magic` = 0x4B000000 (2^23) minus 2^23 is q 2^POS exactly,
        and x' = 2^-POS x. sxs: the sum of x'. `magic` is a runtime value: a logic op takes one
        immediate, and a second constant would cost a register move per code."""
        MASK: tl.constexpr = 0xF << POS
        code = ((v & MASK) | magic).to(tl.float32, bitcast=True)
        if EXACT:
            code = code - 8388608.0
            xs = x * (1.0 / (1 << POS))
        else:
            xs = x * (1 << (16 - POS))
        return tl.fma(code, xs[None, :], part), sxs + xs

    @triton.jit
    def _gemv_input(x_ptr, k, K, mask, SWIGLU: tl.constexpr):
        """x at k as float32; SWIGLU: silu(gate) * up from x = [gate | up], each step rounded to x's dtype
        as silu_and_mul rounds it."""
        if SWIGLU:
            dt = x_ptr.dtype.element_ty
            g = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + k, mask=mask, other=0.0).to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            x = (s * u).to(dt).to(tl.float32)
        else:
            x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _gemv_x(x_ptr, kw, K, EVEN_K: tl.constexpr, WK: tl.constexpr, SWIGLU: tl.constexpr):
        """x at k = 8j + 0..7 for the words j of kw, as eight [WK] float32 vectors in k order: one
        contiguous [WK, 8] load (Triton stages it through shared memory), split in registers. Loading
        each vector in the words' layout instead costs one strided gather per vector, which made the
        L1 the bottleneck (bench/RESULTS.md)."""
        kk = kw[:, None] * 8 + tl.arange(0, 8)[None, :]
        xv = _gemv_input(x_ptr, kk, K, (kk < K) | EVEN_K, SWIGLU)
        even, odd = tl.split(tl.reshape(xv, [WK, 4, 2]))  # k = 8j + 2m, 8j + 2m + 1
        e04, e26 = tl.split(tl.reshape(even, [WK, 2, 2]))
        o15, o37 = tl.split(tl.reshape(odd, [WK, 2, 2]))
        x0, x4 = tl.split(e04)
        x2, x6 = tl.split(e26)
        x1, x5 = tl.split(o15)
        x3, x7 = tl.split(o37)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _gemv_rows(N, K, tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """This GEMV program's output rows (and their mask, as int64) and its K tiles [t0, t1)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
        return pid_n, pid_k, rn, rn < N, rn.to(tl.int64), t0, t1

    @triton.jit
    def _gemv_int4_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, KQ, NG, sqn, ssn, szn, tiles_per_split,
        split, magic, GROUP: tl.constexpr, EVEN_K: tl.constexpr, EXACT: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SWIGLU: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """One row of x against BLOCK_N rows of int4 words on CUDA cores, over this program's share of K.
        Word j of a row holds k = 8j..8j+7 (nibble n at k = 8j + 2n for n < 4, 8j + 2(n - 4) + 1
        beyond). Two shifts of a word put all eight nibbles at bits 8, 12 or 16, where one logic op each
        makes them floats (integer to float conversions run at a quarter of the FMA rate); per group the
        result is scale * (sum(q x) - zero * sum(x)), with sum(q x) = sum(code x') - 128 sum(x').
        Triton pipelines the word loads through shared memory (STAGES tiles in flight): at one row
        nothing else hides their latency."""
        WK: tl.constexpr = BLOCK_K // 8
        GK: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
        TPG: tl.constexpr = BLOCK_K // GK
        OFFSET: tl.constexpr = 0.0 if EXACT else 128.0
        pdl_wait(PDL)
        pid_n, pid_k, rn, nmask, rn64, t0, t1 = _gemv_rows(N, K, tiles_per_split, BLOCK_N, BLOCK_K)
        acc = tl.zeros([BLOCK_N, TPG], dtype=tl.float32)
        for t in tl.range(t0, t1, num_stages=STAGES):
            kw = t * WK + tl.arange(0, WK)
            # Weights are read once per call: don't let them push x, scales and zeros out of L2.
            wmask = nmask[:, None] & ((kw < KQ) | EVEN_K)[None, :]
            w = tl.load(q_ptr + rn64[:, None] * sqn + kw[None, :], mask=wmask, other=0,
                        eviction_policy="evict_first")
            x0, x1, x2, x3, x4, x5, x6, x7 = _gemv_x(x_ptr, kw, K, EVEN_K, WK, SWIGLU)
            part = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
            sxs = tl.zeros([WK], dtype=tl.float32)
            w8 = w << 8  # nibbles 0, 1 at bits 8, 12
            w12 = w >> 12  # nibbles 5, 6, 7 at bits 8, 12, 16
            part, sxs = _gemv_nibble(part, sxs, w8, magic, x0, 8, EXACT)
            part, sxs = _gemv_nibble(part, sxs, w8, magic, x2, 12, EXACT)
            part, sxs = _gemv_nibble(part, sxs, w, magic, x4, 8, EXACT)
            part, sxs = _gemv_nibble(part, sxs, w, magic, x6, 12, EXACT)
            part, sxs = _gemv_nibble(part, sxs, w, magic, x1, 16, EXACT)
            part, sxs = _gemv_nibble(part, sxs, w12, magic, x3, 8, EXACT)
            part, sxs = _gemv_nibble(part, sxs, w12, magic, x5, 12, EXACT)
            part, sxs = _gemv_nibble(part, sxs, w12, magic, x7, 16, EXACT)
            sx = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
            raw = tl.sum(tl.reshape(part, [BLOCK_N, TPG, GK // 8]), 2)
            sxg = tl.sum(tl.reshape(sx, [TPG, GK // 8]), 1)
            sxsg = tl.sum(tl.reshape(sxs, [TPG, GK // 8]), 1)
            # The tile covers whole groups or lies inside one: its first group is (t * BLOCK_K) // GROUP.
            g = (t * BLOCK_K) // GROUP + tl.arange(0, TPG)
            gmask = nmask[:, None] & (g < NG)[None, :]
            s = tl.load(s_ptr + rn64[:, None] * ssn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn64[:, None] * szn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            acc += s * ((raw - OFFSET * sxsg[None, :]) - z * sxg[None, :])
        _store_out(tl.sum(acc, 1), out_ptr, ws_ptr, cnt_ptr, rn, nmask, N, pid_k, pid_n, split, SPLIT)

    @triton.jit
    def _gemv_int8_kernel(
        x_ptr, q_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, sqn, tiles_per_split, split,
        SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
        SWIGLU: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """One row of x against BLOCK_N int8 weight rows on CUDA cores, over this program's share of K:
        products accumulate elementwise; one reduction and one scale per output channel at the end."""
        pdl_wait(PDL)
        pid_n, pid_k, rn, nmask, rn64, t0, t1 = _gemv_rows(N, K, tiles_per_split, BLOCK_N, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for t in tl.range(t0, t1, num_stages=STAGES):
            kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            kmask = kk < K
            b = tl.load(q_ptr + rn64[:, None] * sqn + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                        other=0, eviction_policy="evict_first")
            acc += _int8_to_f32(b) * _gemv_input(x_ptr, kk, K, kmask, SWIGLU)[None, :]
        out = tl.sum(acc, 1) * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        _store_out(out, out_ptr, ws_ptr, cnt_ptr, rn, nmask, N, pid_k, pid_n, split, SPLIT)


def _check_config(cfg: KernelConfig, m: int, int4: bool) -> None:
    for name in ("block_m", "block_n", "block_k"):
        assert _pow2(getattr(cfg, name)), f"{name} {getattr(cfg, name)} is not a power of 2"
    assert cfg.split_k >= 1 and cfg.swizzle >= 1, f"split_k and swizzle must be >= 1: {cfg}"
    if cfg.block_m == 1:
        assert m == 1 and not cfg.left, f"the GEMV (block_m 1) takes one row: {cfg}"
        return
    # tl.dot wants every dimension >= 16; int4 tiles are whole words.
    assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16, f"tile too small for tl.dot: {cfg}"
    if cfg.block_m > DECODE_MAX_ROWS:
        assert cfg.split_k == 1 and not cfg.left, f"the prefill tiles neither split K nor go left: {cfg}"
    if cfg.left:
        assert m <= cfg.block_m and int4, f"the left kernel takes up to block_m rows of int4: {cfg}"


# int4 codes as 16-bit floats (float32 x takes the bf16 ones): the exponent bits in both halves of a
# word, and the power of two they encode.
_MAGIC = {torch.float16: (0x64006400, 1024.0), torch.bfloat16: (0x43004300, 128.0),
          torch.float32: (0x43004300, 128.0)}


def quant_linear_triton(x: Tensor, qw: Int8Weight | Int4Weight, config: KernelConfig | None = None,
                        swiglu: bool = False) -> Tensor:
    """swiglu: x = [gate | up], and silu(gate) * up is the input: computed while loading it in the
    one-row GEMVs (one kernel less per MLP at batch 1), by silu_and_mul before the others."""
    assert triton is not None, "quant_linear_triton needs triton; use quant_linear_ref"
    x2, n, k = _check(x, qw, swiglu)
    m = x2.shape[0]
    cfg = config or default_config(m, n, k, qw, x.device)
    if swiglu and cfg.block_m != 1:
        return quant_linear_triton(silu_and_mul(x2), qw, cfg).view(*x.shape[:-1], n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    int4 = isinstance(qw, Int4Weight)
    _check_config(cfg, m, int4)
    q, s = qw.q, qw.scale
    assert q.stride(-1) == 1 and s.stride(-1) == 1, "codes and scales must be contiguous along K"
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_options(x.device))
    z = qw.zero if int4 else s  # int8: unused placeholder
    group = qw.group if int4 else 1
    ng, ss, sz = (s.shape[1], s.stride(0), z.stride(0)) if int4 else (1, 0, 0)
    # Whole K tiles per split; drop splits that would get none (shapes only: capturable).
    tiles = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(tiles, min(cfg.split_k, tiles))
    split = triton.cdiv(tiles, per_split)
    out_tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    assert split == 1 or out_tiles <= MAX_SPLIT_TILES, f"{out_tiles} output tiles to split: use larger tiles"
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    cnt = _split_counters(x.device) if split > 1 else out
    if cfg.block_m == 1:
        grid = (out_tiles, split)
        if int4:
            # Tiles cover whole groups or lie inside one, of whole words (8 codes).
            assert _pow2(group) and group >= 8 and cfg.block_k >= 8, \
                f"the GEMV takes int4 groups of a power of two >= 8 and block_k >= 8: group {group}, {cfg}"
            exact = x.dtype == torch.float32
            _gemv_int4_kernel[grid](
                x2, q, s, z, out, ws, cnt, n, k, q.shape[1], ng, q.stride(0), ss, sz, per_split, split,
                0x4B000000 if exact else 0x43000000, GROUP=group, EVEN_K=k % cfg.block_k == 0, EXACT=exact,
                SPLIT=split > 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages,
                SWIGLU=swiglu, **launch,
            )
        else:
            _gemv_int8_kernel[grid](
                x2, q, s, out, ws, cnt, n, k, q.stride(0), per_split, split, SPLIT=split > 1,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages, SWIGLU=swiglu, **launch,
            )
        return out.view(*x.shape[:-1], n)
    fast = int4 and _int4_fast(qw, cfg.block_k)
    assert fast or not cfg.left, f"the left kernel takes groups of a power of two >= block_k: {cfg}"
    orc, offset = _MAGIC[x.dtype]
    args = (x2, q, s, z, out, ws, cnt, m, n, k, q.shape[1], ng, x2.stride(0), q.stride(0), ss, sz, n,
            per_split, split, orc)
    common = dict(GROUP=group, OFFSET=offset, HALF=x.dtype == torch.float16,
                  UPCAST=x.device.type == "cpu" and x.dtype != torch.float32, SPLIT=split > 1,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch)
    if cfg.left:
        _decode_int4_kernel[(out_tiles, split)](*args, SXDOT=cfg.sxdot, STAGES=cfg.num_stages, **common)
    else:
        _gemm_kernel[(out_tiles, split)](*args, INT4=int4, FAST=fast, SWIZZLE=cfg.swizzle, **common)
    return out.view(*x.shape[:-1], n)


def quant_linear(x: Tensor, qw: Int8Weight | Int4Weight, swiglu: bool = False) -> Tensor:
    # ROCm builds of torch report their GPUs as device type "cuda" too.
    if x.device.type == "cuda" and triton is not None:
        return quant_linear_triton(x, qw, swiglu=swiglu)
    return quant_linear_ref(x, qw, swiglu)
