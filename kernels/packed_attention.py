"""Paged decode attention over pages of mixed formats (16-bit, int8, int4; see kernels/kv_pages.py).

Row r of the batch sees its block-table pages p < packed_pages[r] as quantized pages (format and token
count from page_meta, all tokens visible), then a 16-bit "tail" of tail_lens[r] tokens in the following
block_size-token pages. Token order is irrelevant to attention (RoPE is already in the cached keys).

`packed_paged_attention_ref` is the plain-PyTorch definition (and the engine's CPU path);
`packed_paged_attention_triton` is the GPU kernel, which dequantizes in registers and never writes a
16-bit copy of the cache; `packed_paged_attention` picks one by device.

The kernel follows paged_attention's: flash-decoding partitions of `pages_per_part` pages per (row, kv
head), then a reduce kernel; grid and workspace from shapes only (CUDA-graph capturable). Inside a
partition, the quantized pages come first: when they share one format (the common case) they stream in
tiles of several pages with no branch; where the format changes, one page at a time behind a branch on
its format. Then the 16-bit tail, exactly as paged_attention does it (bit for bit the same result on
16-bit-only tables with 256-token partitions).
"""

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from optd.kernels import paged_attention as paged
from optd.kernels.kv_pages import (
    FMT_INT4,
    FMT_INT8,
    FMT_NATIVE,
    tokens_per_page,
    unpack_pages,
)
from optd.kernels.paged_attention import TILE, attend_ref, paged_attention_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path must keep working without triton
    triton = None


@dataclass(frozen=True)
class PackedConfig:
    """Launch parameters of the Triton kernel (bench/kv_attention.py --sweep times alternatives)."""

    pages_per_part: int  # pages per flash-decoding partition, a power of 2 (each page is block_bytes)
    num_warps: int = 4
    num_stages: int = 3  # Triton's software pipelining depth (the 16-bit tail; codes with prefetch 0/1)
    prefetch: int = 2  # 0, 1, 2: see _quant_pages
    tile_rows: int = 128  # token rows per quantized tile: pages per tile = tile_rows // (T rounded up to 2^k)
    asm: bool = True  # PTX for the code -> float16 step on NVIDIA GPUs (plain Triton elsewhere)
    maxnreg: int | None = None  # a register cap per thread (more programs per SM), None: the compiler's


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: no point splitting


def default_config(num_rows: int, num_kv_heads: int, max_pages: int, device: torch.device) -> PackedConfig:
    """From shapes only (the launch must be capturable in a CUDA graph): partitions sized for about 8
    programs per SM when the table is full, 8 to 64 pages each. The H100 sweep (bench/kv_attention.py
    --sweep, Llama-3-8B shape, batch 8) found 16-bit pages best at 64 pages per partition and int4 at 8
    to 16, so one rule for both costs up to ~10 % (16-bit at 8k, int4 at 32k). The rest from the same
    sweep: 4 warps (8 lose 30-50 %), tiles of 128 token rows, codes and scales prefetched in registers."""
    pages = max_pages * num_rows * num_kv_heads // (8 * _sm_count(device))
    ppp = min(64, max(8, 1 << max(pages, 1).bit_length() - 1))
    return PackedConfig(pages_per_part=ppp)


def _ceil_div(a, b):
    return -(-a // b)


def packed_paged_attention_ref(
    q: Tensor, layer_data: Tensor, page_meta: Tensor, block_tables: Tensor, packed_pages: Tensor,
    tail_lens: Tensor, scale: float, *, block_size: int, num_kv_heads: int, head_dim: int,
    out: Tensor | None = None,
) -> Tensor:
    num_rows = q.shape[0]
    num_blocks, block_bytes = layer_data.shape
    if num_rows == 0 or not bool((packed_pages > 0).any()):
        # 16-bit pages only: exactly the existing op (a host sync, fine for a reference).
        kv = layer_data.view(q.dtype).view(num_blocks, 2, block_size, num_kv_heads, head_dim)
        return paged_attention_ref(q, kv[:, 0], kv[:, 1], block_tables, tail_lens, scale, out)
    packed = packed_pages.long()[:, None]
    num_pages = packed + _ceil_div(tail_lens.long()[:, None], block_size)
    # Gather only as many pages as the longest row has (a host sync, like paged_attention_ref's).
    block_tables = block_tables[:, : int(num_pages.max())]
    width = block_tables.shape[1]
    p = torch.arange(width, device=q.device)[None, :]
    blocks = block_tables.long()
    meta = page_meta[blocks].long()
    quantized = p < packed
    fmt = torch.where(quantized, meta >> 8, FMT_NATIVE)
    tail_ntok = (tail_lens.long()[:, None] - (p - packed) * block_size).clamp(0, block_size)
    ntok = torch.where(quantized, meta & 255, tail_ntok)
    ntok = torch.where(p < num_pages, ntok, 0)
    fmts = (FMT_NATIVE, FMT_INT8, FMT_INT4)
    cap = {f: tokens_per_page(f, block_bytes, num_kv_heads, head_dim, block_size) for f in fmts}
    slots = max(cap.values())
    # [pages, slots, Hkv, D]: each referenced page unpacked by its own format, token slots zero-padded.
    flat_fmt, flat_blocks = fmt.flatten(), blocks.flatten()
    k = torch.zeros(flat_fmt.shape[0], slots, num_kv_heads, head_dim, device=q.device)
    v = torch.zeros_like(k)
    for f in fmts:
        sel = ((flat_fmt == f) & (ntok.flatten() > 0)).nonzero().squeeze(1)
        if sel.numel():
            kf, vf = unpack_pages(layer_data[flat_blocks[sel]], f, cap[f], num_kv_heads, head_dim, q.dtype)
            k[sel, : cap[f]] = kf
            v[sel, : cap[f]] = vf
    ntok = torch.minimum(ntok, torch.tensor([cap[f] for f in fmts], device=q.device)[fmt.clamp(0, 2)])
    # Unknown formats hold nothing, nor do 16-bit pages among the quantized ones (their metadata is 0).
    ntok = torch.where(((fmt > FMT_NATIVE) & (fmt <= FMT_INT4)) | ~quantized, ntok, 0)
    valid = (torch.arange(slots, device=q.device) < ntok[..., None]).view(num_rows, width * slots)
    k = k.view(num_rows, width * slots, num_kv_heads, head_dim)
    v = v.view(num_rows, width * slots, num_kv_heads, head_dim)
    return attend_ref(q, k, v, valid, scale, out)

if triton is not None:

    @triton.jit
    def _softmax_step(s, m, l):
        """Online softmax over one tile of log2-scaled scores s [GROUP_PAD, N] (-inf where masked).
        A tile with no valid token leaves the state as it is (m stays -inf until a valid one)."""
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        return p, alpha, m_new, l * alpha + tl.sum(p, 1)

    @triton.jit
    def _tile_pages(bt_row, meta_ptr, start, i, count, T: tl.constexpr, NP: tl.constexpr):
        """Block ids and token counts [NP] of the partition's quantized pages i..i+NP-1 (count 0 past
        the last one: nothing of theirs is loaded)."""
        j = i + tl.arange(0, NP)
        here = j < count
        blk = tl.load(bt_row + start + j, mask=here, other=0)
        n = tl.load(meta_ptr + blk, mask=here, other=0) & 255
        return blk, tl.where(here, tl.minimum(n, T), 0)

    @triton.jit
    def _load_codes(words_ptr, blk, n, kvh, T: tl.constexpr, TP: tl.constexpr, CB: tl.constexpr,
                    BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr):
        """K and V codes of head kvh of NP quantized pages as int32 words [NP, TP, CB // 4], four code
        bytes each (rows >= n zero)."""
        t = tl.arange(0, TP)
        w = tl.arange(0, CB // 4)
        base = (blk.to(tl.int64) * BLOCK_BYTES + kvh * SLICE) // 4
        rows = words_ptr + base[:, None, None] + (t[:, None] * (CB // 4) + w[None, :])[None, :, :]
        mask = (t[None, :] < n[:, None])[:, :, None]
        # The cache is streamed once per call: don't let it push q, tables and metadata out of L2.
        kc = tl.load(rows, mask=mask, other=0, eviction_policy="evict_first")
        vc = tl.load(rows + T * (CB // 4), mask=mask, other=0, eviction_policy="evict_first")
        return kc, vc

    @triton.jit
    def _load_scales(half_ptr, blk, n, kvh, T: tl.constexpr, TP: tl.constexpr, CB: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr):
        """K scale and zero [NP, HEAD_DIM], V scale and zero [NP, TP] (zero past n), float16."""
        t = tl.arange(0, TP)
        d = tl.arange(0, HEAD_DIM)
        h = half_ptr + ((blk.to(tl.int64) * BLOCK_BYTES + kvh * SLICE) // 2 + T * CB)[:, None]  # after codes
        ks = tl.load(h + d[None, :])
        kz = tl.load(h + HEAD_DIM + d[None, :])
        vmask = t[None, :] < n[:, None]
        vs = tl.load(h + 2 * HEAD_DIM + t[None, :], mask=vmask, other=0.0)
        vz = tl.load(h + 2 * HEAD_DIM + T + t[None, :], mask=vmask, other=0.0)
        return ks, kz, vs, vz

    @triton.jit
    def _join4(o0, o1, o2, o3):
        """[..., W] x 4 -> [..., W, 4] with o_k at k (tl.join adds a last axis of 2)."""
        return tl.join(tl.join(o0, o2), tl.join(o1, o3))

    @triton.jit
    def _codes(w, INT4: tl.constexpr, NP: tl.constexpr, TP: tl.constexpr, HEAD_DIM: tl.constexpr,
               F16: tl.constexpr, ASM: tl.constexpr):
        """Code words [NP, TP, W] -> [NP, TP, HEAD_DIM] floats x with no conversion instruction (they run
        at a quarter rate on NVIDIA GPUs): the code goes into the low mantissa bits of 1024 (float16
        0x6400) or of 2^23 (float32, which is then subtracted). int8: x = 1024 + c. int4 (even channel in
        a byte's low nibble): even x = 1024 + c, odd x = 1024 + 16 c (the nibble stays where it is); the
        caller scales the odd channels back. ASM (NVIDIA): PRMT builds two float16 from a word's bytes and
        the 0x64 exponent byte; elsewhere the same bits by shifts and masks."""
        if F16 and ASM:
            if INT4:
                o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                    asm="""{
                    .reg .b32 t0, t1, t2, t3;
                    prmt.b32 t0, $8, 0x64646464, 0x4040;
                    prmt.b32 t1, $8, 0x64646464, 0x4141;
                    prmt.b32 t2, $8, 0x64646464, 0x4242;
                    prmt.b32 t3, $8, 0x64646464, 0x4343;
                    and.b32 t0, t0, 0xFFF0FF0F;
                    and.b32 t1, t1, 0xFFF0FF0F;
                    and.b32 t2, t2, 0xFFF0FF0F;
                    and.b32 t3, t3, 0xFFF0FF0F;
                    mov.b32 {$0, $1}, t0;
                    mov.b32 {$2, $3}, t1;
                    mov.b32 {$4, $5}, t2;
                    mov.b32 {$6, $7}, t3;
                    }""",
                    constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w], dtype=(tl.float16,) * 8, is_pure=True,
                    pack=1)
                x = tl.join(_join4(o0, o2, o4, o6), _join4(o1, o3, o5, o7))
            else:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(
                    asm="""{
                    .reg .b32 t0, t1;
                    prmt.b32 t0, $4, 0x64646464, 0x4140;
                    prmt.b32 t1, $4, 0x64646464, 0x4342;
                    mov.b32 {$0, $1}, t0;
                    mov.b32 {$2, $3}, t1;
                    }""",
                    constraints="=h,=h,=h,=h,r", args=[w], dtype=(tl.float16,) * 4, is_pure=True, pack=1)
                x = _join4(o0, o1, o2, o3)
        else:
            magic = 0x6400 if F16 else 0x4B000000
            if INT4:
                lo0 = (w & 0xF) | magic
                hi0 = (w & 0xF0) | magic
                lo1 = ((w >> 8) & 0xF) | magic
                hi1 = ((w >> 8) & 0xF0) | magic
                lo2 = ((w >> 16) & 0xF) | magic
                hi2 = ((w >> 16) & 0xF0) | magic
                lo3 = ((w >> 24) & 0xF) | magic
                hi3 = ((w >> 24) & 0xF0) | magic
                x = tl.join(_join4(lo0, lo1, lo2, lo3), _join4(hi0, hi1, hi2, hi3))
            else:
                x = _join4(w & 0xFF | magic, (w >> 8) & 0xFF | magic, (w >> 16) & 0xFF | magic,
                           (w >> 24) & 0xFF | magic)
            if F16:
                x = x.to(tl.int16).to(tl.float16, bitcast=True)
            else:
                x = x.to(tl.float32, bitcast=True) - 8388608.0
        return tl.reshape(x, [NP, TP, HEAD_DIM])

    @triton.jit
    def _quant_tile(
        qd, kc, vc, ks, kz, vs, vz, n, m, l, acc, scale_log2,
        INT4: tl.constexpr, NP: tl.constexpr, TP: tl.constexpr, HEAD_DIM: tl.constexpr, F16: tl.constexpr,
        ASM: tl.constexpr,
    ):
        """NP quantized pages of one format (NP * TP token rows) into the online softmax; qd is q in the
        dots' dtype: float16 for 16-bit models (bf16 ones too: its 11-bit mantissa keeps more of q, K and
        p*vs than bf16's 8), else float32. K is dequantized per element (code * scale + zero, one
        rounding: an fp16 cache's precision). V is not: sum_t p_t (c_t*vs_t + vz_t) = sum_t (p_t*vs_t) c_t
        + sum_t p_t*vz_t, so its codes go to the dot as 1024 + c (an OR), the 1024 coming off with the
        zero term. p*vs is scaled by 64 while in float16, keeping the small weights of long contexts out
        of its subnormal range."""
        ROWS: tl.constexpr = NP * TP
        dt = tl.float16 if F16 else tl.float32
        off = 1024.0 if F16 else 0.0
        vs_scale = 64.0 if F16 else 1.0
        # Per channel: x * cs + co = the code (int4's odd channels hold 16 c).
        if INT4:
            cs = tl.where(tl.arange(0, HEAD_DIM) % 2 == 1, 0.0625, 1.0)
        else:
            cs = tl.full([HEAD_DIM], 1.0, tl.float32)
        co = -off * cs
        code = _codes(kc, INT4, NP, TP, HEAD_DIM, F16, ASM) * cs.to(dt)[None, None, :]
        code = code + co.to(dt)[None, None, :]  # exact: the 1024 offset off
        k = tl.reshape(code * ks.to(dt)[:, None, :] + kz.to(dt)[:, None, :], [ROWS, HEAD_DIM])
        s = tl.dot(qd, tl.trans(k), input_precision="ieee") * scale_log2  # ieee: no tf32 on fp32
        valid = tl.reshape(tl.arange(0, TP)[None, :] < n[:, None], [ROWS])
        s = tl.where(valid[None, :], s, float("-inf"))
        p, alpha, m, l = _softmax_step(s, m, l)
        pv = (p * tl.reshape(vs.to(tl.float32) * vs_scale, [ROWS])[None, :]).to(dt)
        vzr = tl.reshape(vz.to(tl.float32), [ROWS])
        bias = tl.sum(p * vzr[None, :], 1)
        spv = tl.sum(pv.to(tl.float32), 1)
        vq = tl.reshape(_codes(vc, INT4, NP, TP, HEAD_DIM, F16, ASM), [ROWS, HEAD_DIM])
        pvc = tl.dot(pv, vq, input_precision="ieee")
        acc = acc * alpha[:, None] + (pvc - off * spv[:, None]) * (cs / vs_scale)[None, :] + bias[:, None]
        return m, l, acc

    @triton.jit
    def _quant_pages(
        qd, words_ptr, half_ptr, meta_ptr, bt_row, start, count, kvh, m, l, acc, scale_log2,
        INT4: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr, PREFETCH: tl.constexpr,
        F16: tl.constexpr, ASM: tl.constexpr,
    ):
        """The partition's quantized pages, all of one format (the common case: no branch), NP per tile.
        PREFETCH 0: every load in the loop, for Triton's software pipeliner (num_stages) to stream; 1: the
        scales (too few bytes per thread for the pipeliner) one tile ahead in registers, the codes left
        to the pipeliner; 2: codes and scales one tile ahead in registers."""
        if PREFETCH == 0:
            for i in range(0, count, NP):
                blk, n = _tile_pages(bt_row, meta_ptr, start, i, count, T, NP)
                kc, vc = _load_codes(words_ptr, blk, n, kvh, T, TP, CB, BLOCK_BYTES, SLICE)
                ks, kz, vs, vz = _load_scales(half_ptr, blk, n, kvh, T, TP, CB, HEAD_DIM, BLOCK_BYTES, SLICE)
                m, l, acc = _quant_tile(qd, kc, vc, ks, kz, vs, vz, n, m, l, acc, scale_log2, INT4, NP, TP,
                                        HEAD_DIM, F16, ASM)
        elif PREFETCH == 1:
            blk, n = _tile_pages(bt_row, meta_ptr, start, 0, count, T, NP)
            ks, kz, vs, vz = _load_scales(half_ptr, blk, n, kvh, T, TP, CB, HEAD_DIM, BLOCK_BYTES, SLICE)
            for i in range(0, count, NP):
                cblk, cn = _tile_pages(bt_row, meta_ptr, start, i, count, T, NP)  # from i: pipelineable
                kc, vc = _load_codes(words_ptr, cblk, cn, kvh, T, TP, CB, BLOCK_BYTES, SLICE)
                blk1, n1 = _tile_pages(bt_row, meta_ptr, start, i + NP, count, T, NP)
                ks1, kz1, vs1, vz1 = _load_scales(half_ptr, blk1, n1, kvh, T, TP, CB, HEAD_DIM, BLOCK_BYTES,
                                                  SLICE)
                m, l, acc = _quant_tile(qd, kc, vc, ks, kz, vs, vz, n, m, l, acc, scale_log2, INT4, NP, TP,
                                        HEAD_DIM, F16, ASM)
                ks, kz, vs, vz, n = ks1, kz1, vs1, vz1, n1
        else:
            blk, n = _tile_pages(bt_row, meta_ptr, start, 0, count, T, NP)
            kc, vc = _load_codes(words_ptr, blk, n, kvh, T, TP, CB, BLOCK_BYTES, SLICE)
            ks, kz, vs, vz = _load_scales(half_ptr, blk, n, kvh, T, TP, CB, HEAD_DIM, BLOCK_BYTES, SLICE)
            for i in range(0, count, NP):
                blk1, n1 = _tile_pages(bt_row, meta_ptr, start, i + NP, count, T, NP)
                kc1, vc1 = _load_codes(words_ptr, blk1, n1, kvh, T, TP, CB, BLOCK_BYTES, SLICE)
                ks1, kz1, vs1, vz1 = _load_scales(half_ptr, blk1, n1, kvh, T, TP, CB, HEAD_DIM, BLOCK_BYTES,
                                                  SLICE)
                m, l, acc = _quant_tile(qd, kc, vc, ks, kz, vs, vz, n, m, l, acc, scale_log2, INT4, NP, TP,
                                        HEAD_DIM, F16, ASM)
                kc, vc, ks, kz, vs, vz, n = kc1, vc1, ks1, kz1, vs1, vz1, n1
        return m, l, acc

    @triton.jit
    def _quant_page_any(
        qd, words_ptr, half_ptr, meta_ptr, bt_row, start, i, count, kvh, m, l, acc, scale_log2,
        INT4: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, CB: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
    ):
        """Page i of the partition alone (a partition where the format changes)."""
        blk, n = _tile_pages(bt_row, meta_ptr, start, i, count, T, 1)
        kc, vc = _load_codes(words_ptr, blk, n, kvh, T, TP, CB, BLOCK_BYTES, SLICE)
        ks, kz, vs, vz = _load_scales(half_ptr, blk, n, kvh, T, TP, CB, HEAD_DIM, BLOCK_BYTES, SLICE)
        return _quant_tile(qd, kc, vc, ks, kz, vs, vz, n, m, l, acc, scale_log2, INT4, 1, TP, HEAD_DIM, F16,
                           ASM)

    @triton.jit
    def _partition_kernel(
        q_ptr, words_ptr, half_ptr, kv_ptr, meta_ptr, bt_ptr, packed_ptr, tail_ptr, out_ptr,
        m_ptr, l_ptr, acc_ptr, scale_log2, sq0, sq1, sbt, so0, so1, num_heads, num_parts,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_ITEMS: tl.constexpr,
        SLICE: tl.constexpr, T8: tl.constexpr, TP8: tl.constexpr, T4: tl.constexpr, TP4: tl.constexpr,
        NP8: tl.constexpr, NP4: tl.constexpr, PPP: tl.constexpr, TILE: tl.constexpr, SINGLE: tl.constexpr,
        UPCAST: tl.constexpr, PREFETCH: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
    ):
        """Row r, kv head kvh, pages [part * PPP, (part + 1) * PPP) of the row: its quantized pages in
        tiles of NP8 (int8) or NP4 (int4) pages, then its 16-bit tail in TILE-token tiles exactly as
        paged_attention's kernel."""
        r = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        packed = tl.load(packed_ptr + r)
        tail = tl.load(tail_ptr + r)
        num_pages = packed + tl.cdiv(tail, BLOCK_SIZE)
        start = part * PPP
        if not SINGLE and start >= num_pages:  # the reduce kernel ignores partitions past the row's pages
            return

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        # Padding rows (g >= GROUP) load zeros and are never stored: tl.dot needs M >= 16.
        q = tl.load(q_ptr + r * sq0 + heads[:, None] * sq1 + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        if UPCAST:  # the CPU interpreter would matmul bf16 as raw uint16 bits
            q = q.to(tl.float32)
        qd = q.to(tl.float16 if F16 else tl.float32)  # for quantized pages
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        bt_row = bt_ptr + r.to(tl.int64) * sbt

        nq = tl.minimum(start + PPP, packed) - start  # quantized pages in this partition
        if nq > 0:
            idx = tl.arange(0, PPP)
            here = idx < nq
            fmts = tl.load(meta_ptr + tl.load(bt_row + start + idx, mask=here, other=0), mask=here) >> 8
            lo = tl.min(tl.where(here, fmts, 255), 0)
            hi = tl.max(tl.where(here, fmts, 0), 0)
            if (lo == 1) & (hi == 1):
                m, l, acc = _quant_pages(qd, words_ptr, half_ptr, meta_ptr, bt_row, start, nq, kvh, m, l, acc,
                                         scale_log2, False, T8, TP8, HEAD_DIM, NP8, HEAD_DIM, BLOCK_BYTES,
                                         SLICE, PREFETCH, F16, ASM)
            elif (lo == 2) & (hi == 2):
                m, l, acc = _quant_pages(qd, words_ptr, half_ptr, meta_ptr, bt_row, start, nq, kvh, m, l, acc,
                                         scale_log2, True, T4, TP4, HEAD_DIM // 2, NP4, HEAD_DIM, BLOCK_BYTES,
                                         SLICE, PREFETCH, F16, ASM)
            else:  # the format changes inside this partition: a branch per page
                for i in range(nq):
                    f = tl.load(meta_ptr + tl.load(bt_row + start + i)) >> 8
                    if f == 1:
                        m, l, acc = _quant_page_any(qd, words_ptr, half_ptr, meta_ptr, bt_row, start, i, nq,
                                                    kvh, m, l, acc, scale_log2, False, T8, TP8, HEAD_DIM,
                                                    HEAD_DIM, BLOCK_BYTES, SLICE, F16, ASM)
                    elif f == 2:
                        m, l, acc = _quant_page_any(qd, words_ptr, half_ptr, meta_ptr, bt_row, start, i, nq,
                                                    kvh, m, l, acc, scale_log2, True, T4, TP4, HEAD_DIM // 2,
                                                    HEAD_DIM, BLOCK_BYTES, SLICE, F16, ASM)

        # The 16-bit tail's tokens that fall in this partition's pages.
        tok_start = (tl.maximum(start, packed) - packed) * BLOCK_SIZE
        tok_end = tl.minimum((tl.minimum(start + PPP, num_pages) - packed) * BLOCK_SIZE, tail)
        for off in range(tok_start, tok_end, TILE):
            pos = off + tl.arange(0, TILE)
            valid = pos < tok_end
            # Gather the physical block per token; the tile may span several cache blocks.
            blk = tl.load(bt_row + packed + pos // BLOCK_SIZE, mask=valid, other=0)
            tok = blk.to(tl.int64) * BLOCK_ITEMS + ((pos % BLOCK_SIZE) * NUM_KV_HEADS + kvh) * HEAD_DIM
            k = tl.load(kv_ptr + tok[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            p, alpha, m, l = _softmax_step(s, m, l)
            vtok = tok + BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM
            v = tl.load(kv_ptr + vtok[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")

        hmask = g < GROUP
        if SINGLE:  # all the row's pages in this program: normalize and write the output directly
            res = acc / tl.where(l > 0, l, 1.0)[:, None]  # no visible token: acc is 0 -> zeros
            o = out_ptr + r * so0 + heads[:, None] * so1 + d[None, :]
            tl.store(o, res.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        else:
            row = (r.to(tl.int64) * num_heads + heads) * num_parts + part
            tl.store(m_ptr + row, m, mask=hmask)
            tl.store(l_ptr + row, l, mask=hmask)
            tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=hmask[:, None])


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def packed_paged_attention_triton(
    q: Tensor, layer_data: Tensor, page_meta: Tensor, block_tables: Tensor, packed_pages: Tensor,
    tail_lens: Tensor, scale: float, *, block_size: int, num_kv_heads: int, head_dim: int,
    out: Tensor | None = None, config: PackedConfig | None = None,
) -> Tensor:
    assert triton is not None, "packed_paged_attention_triton needs triton; use packed_paged_attention_ref"
    num_rows, num_heads, _ = q.shape
    block_bytes = layer_data.shape[1]
    assert q.shape[2] == head_dim and num_heads % num_kv_heads == 0, f"q {tuple(q.shape)}, Hkv {num_kv_heads}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim} is not a power of 2 >= 16"
    assert block_bytes == 2 * block_size * num_kv_heads * head_dim * q.dtype.itemsize, "block_bytes mismatch"
    assert layer_data.dtype == torch.uint8 and layer_data.is_contiguous(), "layer_data: pool.layer_data(i)"
    assert q.stride(2) == 1 and block_tables.stride(1) == 1, "q's head_dim and the tables' pages contiguous"
    assert page_meta.dtype == block_tables.dtype == packed_pages.dtype == tail_lens.dtype == torch.int32
    assert block_tables.shape[0] == packed_pages.shape[0] == tail_lens.shape[0] == num_rows
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [num_rows, num_heads, head_dim]"
    if num_rows == 0:
        return out
    max_pages = block_tables.shape[1]
    cfg = config or default_config(num_rows, num_kv_heads, max_pages, q.device)
    ppp = cfg.pages_per_part
    assert ppp & (ppp - 1) == 0, f"pages_per_part {ppp} is not a power of 2"
    group = num_heads // num_kv_heads
    t8 = tokens_per_page(FMT_INT8, block_bytes, num_kv_heads, head_dim, block_size)
    t4 = tokens_per_page(FMT_INT4, block_bytes, num_kv_heads, head_dim, block_size)
    tp8, tp4 = _pow2_at_least_16(t8), _pow2_at_least_16(t4)
    # Grid and workspace come from shapes only, so the launch is capturable in a CUDA graph.
    num_parts = max(1, triton.cdiv(max_pages, ppp))
    single = num_parts == 1
    ws = (num_rows, num_heads, 1 if single else num_parts)
    m = torch.empty(ws, dtype=torch.float32, device=q.device)
    l = torch.empty(ws, dtype=torch.float32, device=q.device)
    acc = torch.empty((*ws, head_dim), dtype=torch.float32, device=q.device)
    _partition_kernel[(num_rows, num_kv_heads, num_parts)](
        q, layer_data.view(torch.int32), layer_data.view(torch.float16), layer_data.view(q.dtype), page_meta,
        block_tables, packed_pages, tail_lens, out, m, l, acc, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), num_heads, num_parts,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, NUM_KV_HEADS=num_kv_heads, BLOCK_BYTES=block_bytes,
        BLOCK_ITEMS=block_bytes // q.dtype.itemsize, SLICE=block_bytes // num_kv_heads,
        T8=t8, TP8=tp8, T4=t4, TP4=tp4, NP8=max(1, cfg.tile_rows // tp8), NP4=max(1, cfg.tile_rows // tp4),
        PPP=ppp, TILE=TILE,
        SINGLE=single, UPCAST=q.device.type == "cpu" and q.dtype != torch.float32, PREFETCH=cfg.prefetch,
        F16=q.dtype != torch.float32, ASM=cfg.asm and q.device.type == "cuda" and torch.version.hip is None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    if not single:
        paged.reduce_partitions[(num_rows, num_heads)](
            m, l, acc, tail_lens, packed_pages, out, out.stride(0), out.stride(1), num_heads, num_parts,
            HEAD_DIM=head_dim, PART=ppp, CHUNK=16, BLOCK_SIZE=block_size, PACKED=True,
        )
    return out


def packed_paged_attention(
    q: Tensor, layer_data: Tensor, page_meta: Tensor, block_tables: Tensor, packed_pages: Tensor,
    tail_lens: Tensor, scale: float, *, block_size: int, num_kv_heads: int, head_dim: int,
    out: Tensor | None = None,
) -> Tensor:
    kw = dict(block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim, out=out)
    # ROCm builds of torch report their GPUs as device type "cuda" too.
    if q.device.type == "cuda" and triton is not None:
        return packed_paged_attention_triton(q, layer_data, page_meta, block_tables, packed_pages, tail_lens,
                                             scale, **kw)
    return packed_paged_attention_ref(q, layer_data, page_meta, block_tables, packed_pages, tail_lens, scale,
                                      **kw)
