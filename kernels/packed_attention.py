"""Paged decode attention over pages of mixed formats (16-bit, int8, int4; see kernels/kv_pages.py).

Row r of the batch sees its block-table pages p < packed_pages[r] as quantized pages (format and token
count from page_meta, all tokens visible), then a 16-bit "tail" of tail_lens[r] tokens in the following
block_size-token pages. Token order is irrelevant to attention (RoPE is already in the cached keys).

`packed_paged_attention_ref` is the plain-PyTorch definition (and the engine's CPU path);
`packed_paged_attention_triton` is the GPU kernel, which dequantizes in registers and never writes a
16-bit copy of the cache; `packed_paged_attention` picks one by device.

The kernel follows paged_attention's: flash-decoding partitions of up to `pages_per_part` pages per (row, kv
head), then a reduce kernel; grid and workspace from shapes only (CUDA-graph capturable). A partition of
16-bit pages only runs exactly as paged_attention does (bit for bit the same result on 16-bit-only
tables with 256-token partitions). A partition with quantized pages streams them in tiles of one or two
pages of one format (each format's pages in a loop of their own, the others masked out), then its 16-bit
tail. The tiles cost no arithmetic per dequantized element: K's per-channel scale and zero fold into q
(per page), V's per-token ones into the probabilities, and the codes go to the tensor cores as float16
1024 + code, built by bit operations (K's and int4 V's in the dots' own registers). Scores are
transposed (tokens x query heads), so the query heads of a GQA group are the dots' N rather than rows
padded to 16; a tile's two pages are two "streams" of each head (columns of their own, as
flash-decoding partitions), joined at the end of the partition. On sm_90+ each tile starts the next
tile's pages on their way from DRAM into L2 (_prefetch_l2). bench/RESULTS.md has the H100 numbers.
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
from optd.kernels.pdl import pdl_options

try:
    import triton
    import triton.language as tl

    from optd.kernels.pdl import pdl_wait
except ImportError:  # the reference path must keep working without triton
    triton = None


@dataclass(frozen=True)
class PackedConfig:
    """Launch parameters of the Triton kernel (bench/kv_attention.py --sweep times alternatives)."""

    pages_per_part: int  # the most pages in a flash-decoding partition (each page is block_bytes)
    num_warps: int = 4
    num_stages: int = 3  # Triton's software pipelining depth for the 16-bit tail
    # The same for the quantized pages' loop (1: none; with 2, Triton also stages the page lookups
    # through shared memory, behind barriers: H100, 8B shape, 32k int4 190.6 us against 177.6 us).
    quant_stages: int = 1
    # Token rows per int4 tile: pages per tile (1, 2) = tile_rows // (T4 rounded to 2^k), and 1 for GQA
    # groups of more than 4 heads (see packed_paged_attention_triton).
    tile_rows: int = 128
    asm: bool = True  # PTX for the code -> float16 step on NVIDIA GPUs (plain Triton elsewhere)
    l2_prefetch: bool = True  # the next tile's pages into L2 during this one (sm_90+; see _prefetch_l2)
    maxnreg: int | None = 128  # a register cap per thread (NVIDIA): 4 programs of 4 warps per SM


# Programs of the partition kernel resident on one SM at once with the default config: 128 registers
# per thread (maxnreg) and ~50 KB of shared memory each.
PROGRAMS_PER_SM = 4
# The most pages per partition the default config gives a program, while the grid fills whole waves.
MAX_PAGES_PER_PART = 24


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: no point splitting


def default_config(num_rows: int, num_kv_heads: int, max_pages: int, device: torch.device) -> PackedConfig:
    """From shapes only (the launch must be capturable in a CUDA graph): the fewest waves of resident
    programs in which no partition holds more than MAX_PAGES_PER_PART pages, partitions then as even as
    the waves allow (an even count: a tile holds two pages). A last wave a fifth full costs about as much
    as a full one; fewer, longer partitions save per-program setup and reduce work. The H100 sweeps
    (bench/kv_attention.py --sweep, Llama-3-8B shape, batch 8): at 32k tokens int8 and int4 pages run
    best at 20-24 pages per partition; at 8k, int8 at 18 pages = 1.9 waves in 72-75 us, against 95 us at
    16 pages = 2.2 waves and 89 us at 24 pages = 1.5 waves."""
    slots = PROGRAMS_PER_SM * _sm_count(device)
    pairs = num_rows * num_kv_heads
    min_parts = _ceil_div(max_pages, MAX_PAGES_PER_PART)
    waves = _ceil_div(min_parts * pairs, slots)
    parts = max(min_parts, waves * slots // pairs)
    ppp = _ceil_div(max_pages, parts)
    ppp = max(2, ppp + ppp % 2)
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
    def _column_softmax_step(s, m, l):
        """_softmax_step over the columns of transposed scores s [N, NC] (one stream per column)."""
        m_new = tl.maximum(m, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[None, :])
        return p, alpha, m_new, l * alpha + tl.sum(p, 0)

    @triton.jit
    def _join4(o0, o1, o2, o3):
        """[..., W] x 4 -> [..., W, 4] with o_k at k (tl.join adds a last axis of 2)."""
        return tl.join(tl.join(o0, o2), tl.join(o1, o3))

    @triton.jit
    def _code_order(INT4: tl.constexpr, N: tl.constexpr):
        """The element behind each of the N positions along a dot's reduction that _k_codes unpacks code
        words into (a permutation of 0..N-1): K's channels in the score dot; int4 V's tile rows in the
        value dot. int8: the identity. int4: in each run of 8 * RUN elements (RUN code words: 4, or 2 when
        N is 16), position 4 RUN h + 4c + 2a + b holds element 8c + 4b + 2h + a, so that each word's 8
        elements land in the 4 + 4 positions one thread holds in two consecutive k16 steps of an mma
        operand of kWidth 4 (Triton then streams the words through shared memory and unpacks them in
        the dot's own registers)."""
        p = tl.arange(0, N)
        if INT4:
            RUN: tl.constexpr = 4 if N >= 32 else N // 8
            return (p // (8 * RUN) * (8 * RUN) + (p // 4) % RUN * 8 + p % 2 * 4 + (p // (4 * RUN)) % 2 * 2
                    + (p // 2) % 2)
        return p

    @triton.jit
    def _as_float(x, F16: tl.constexpr):
        """Integer bits -> float16 (low 16 bits), or float32 less the 2^23 of its magic exponent."""
        return x.to(tl.int16).to(tl.float16, bitcast=True) if F16 else x.to(tl.float32, bitcast=True) - 2**23

    @triton.jit
    def _int4_codes(w, F16: tl.constexpr, ASM: tl.constexpr):
        """int4 code words -> 8 floats each, o_j the code of channel j // 2 + 4 (j % 2) of the word (even
        channels in the low nibbles) as 1024 + c, odd channels 1024 + 16 c (the nibble stays where it
        is; the caller scales them back); float32: c and 16 c. ASM (NVIDIA): two codes per AND-OR into
        the mantissas of two float16 1024 (0x64006400)."""
        if F16 and ASM:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t0, t1, t2, t3, s, e;
                mov.b32 e, 0x64006400;
                lop3.b32 t0, $8, 0x000F000F, e, 0xEA;
                lop3.b32 t1, $8, 0x00F000F0, e, 0xEA;
                shr.u32 s, $8, 8;
                lop3.b32 t2, s, 0x000F000F, e, 0xEA;
                lop3.b32 t3, s, 0x00F000F0, e, 0xEA;
                mov.b32 {$0, $1}, t0;
                mov.b32 {$2, $3}, t1;
                mov.b32 {$4, $5}, t2;
                mov.b32 {$6, $7}, t3;
                }""",
                constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w], dtype=(tl.float16,) * 8, is_pure=True,
                pack=1)
        else:
            magic = 0x6400 if F16 else 0x4B000000
            o0 = _as_float(w & 0xF | magic, F16)
            o1 = _as_float((w >> 16) & 0xF | magic, F16)
            o2 = _as_float(w & 0xF0 | magic, F16)
            o3 = _as_float((w >> 16) & 0xF0 | magic, F16)
            o4 = _as_float((w >> 8) & 0xF | magic, F16)
            o5 = _as_float((w >> 24) & 0xF | magic, F16)
            o6 = _as_float((w >> 8) & 0xF0 | magic, F16)
            o7 = _as_float((w >> 24) & 0xF0 | magic, F16)
        return o0, o1, o2, o3, o4, o5, o6, o7

    @triton.jit
    def _k_codes(w, INT4: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, F16: tl.constexpr,
                 ASM: tl.constexpr):
        """Code words [R, W] packed along a dot's reduction (K: a token's channels; int4 V: a channel's
        tokens) -> [R, HEAD_DIM] floats x in _code_order with no conversion instruction (a quarter rate
        on NVIDIA GPUs): the code goes into the low mantissa bits of 1024 (float16 0x6400) or of 2^23
        (float32, which is then subtracted). int8: x = 1024 + c. int4: see _int4_codes. Every op on the
        way is elementwise or moves values within a thread, so Triton streams the words (not the floats)
        through shared memory into the dot's operand layout."""
        if INT4:
            RUN: tl.constexpr = 4 if HEAD_DIM >= 32 else HEAD_DIM // 8
            w4 = tl.reshape(w, [R, HEAD_DIM // (8 * RUN), RUN])
            o0, o1, o2, o3, o4, o5, o6, o7 = _int4_codes(w4, F16, ASM)
            # [R, W/RUN, word c, 2, 2 (o0..o3 or o4..o7), half h] -> [R, W/RUN, h, c, 2, 2]
            x = tl.permute(tl.join(_join4(o0, o1, o2, o3), _join4(o4, o5, o6, o7)), 0, 1, 5, 2, 3, 4)
        else:
            x = _int8_codes(w, F16, ASM)
        return tl.reshape(x, [R, HEAD_DIM])

    @triton.jit
    def _int8_codes(w, F16: tl.constexpr, ASM: tl.constexpr):
        """int8 code words [..., W] -> [..., W, 4] floats 1024 + c (float32: c), byte k at k. ASM (NVIDIA):
        a PRMT of two bytes and the 0x64 exponent byte makes two float16."""
        if F16 and ASM:
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
            x = _as_float(_join4(w & 0xFF | magic, (w >> 8) & 0xFF | magic, (w >> 16) & 0xFF | magic,
                                 (w >> 24) & 0xFF | magic), F16)
        return x

    @triton.jit
    def _int8_v_codes(w, R: tl.constexpr, HEAD_DIM: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        """int8 V code words [R, W] (a token's channels) -> [R, HEAD_DIM] floats 1024 + c (float32: c). V's
        dot reduces over tokens while these codes are packed along channels: the floats go through
        shared memory to the dot (ldmatrix.trans)."""
        x = tl.reshape(_int8_codes(w, F16, ASM), [R, HEAD_DIM])
        if F16 and ASM:
            # An opaque copy: Triton sizes the dot's operand layout (kWidth) from the narrowest load
            # before it and halves it per join on the way; through this it sees 16-bit values and keeps
            # kWidth 2, where ldmatrix's registers are the mma's own (4 would shuffle them with moves).
            x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=False,
                                          pack=2)
        return x

    @triton.jit
    def _tile_rows(INT4: tl.constexpr, TP: tl.constexpr, NS: tl.constexpr):
        """Page slot and token of each row of a tile (NS pages of TP token slots laid end to end): row r
        holds slot-token _code_order(INT4, NS * TP)[r]. int4: the order int4 V's words unpack into for
        the value dot, so the scores' rows are its operand's as they come."""
        u = _code_order(INT4, NS * TP)
        return u // TP, u % TP

    @triton.jit
    def _page(bt_row, meta_ptr, start, j, count, FMT: tl.constexpr, T: tl.constexpr):
        """Block id and visible token count of the partition's quantized page j: count 0 past the last
        one and on pages of another format (nothing of theirs is loaded). Scalars: every thread holds
        them, so the tile's rows and columns pick theirs with no exchange between threads."""
        here = j < count
        blk = tl.load(bt_row + start + j, mask=here, other=0)
        meta = tl.load(meta_ptr + blk, mask=here, other=0)
        return blk, _visible(meta, here, FMT, T)

    @triton.jit
    def _visible(meta, here, FMT: tl.constexpr, T: tl.constexpr):
        """A page's visible token count from its metadata: 0 if not here or of another format."""
        return tl.where(here & (meta >> 8 == FMT), tl.minimum(meta & 255, T), 0)

    @triton.jit
    def _pick(slot, a0, a1):
        """Per row or column of a tile: a0 in slot 0, a1 in slot 1 (a tile holds one or two pages)."""
        return tl.where(slot == 0, a0, a1)

    @triton.jit
    def _slice_start(blk, kvh, UNIT: tl.constexpr, BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr):
        """Where kv head kvh's SLICE bytes of page blk start (codes, then scales), in UNIT-byte elements."""
        return blk.to(tl.int64) * (BLOCK_BYTES // UNIT) + kvh * (SLICE // UNIT)

    @triton.jit
    def _asm_words(ptrs, here):
        """tl.load(ptrs, here, other=0) of 32-bit words as inline PTX (NVIDIA), streamed (evict first).
        An elementwise op to Triton: it computes the addresses and loads the words right in the layout
        their user needs, where a tl.load's words would go through shared memory (see _k_code_loads)."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .pred p;
            setp.ne.b32 p, $2, 0;
            mov.u32 $0, 0;
            @p ld.global.L1::evict_first.b32 $0, [$1];
            }""",
            constraints="=r,l,r", args=[ptrs, here.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _k_code_loads(words_ptr, blk0, n0, blk1, n1, kvh, INT4: tl.constexpr, T: tl.constexpr,
                      TP: tl.constexpr, CB: tl.constexpr, NS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                      SLICE: tl.constexpr, ASM: tl.constexpr):
        """The K codes of a tile of pages (blk0, n0) and (blk1, n1) in slots 0 and 1, rows as _tile_rows:
        code words [NS*TP, CB/4], zero past the visible tokens."""
        slot, t = _tile_rows(INT4, TP, NS)
        base = _slice_start(_pick(slot, blk0, blk1), kvh, 4, BLOCK_BYTES, SLICE) + t * (CB // 4)
        words = words_ptr + base[:, None] + tl.arange(0, CB // 4)[None, :]
        here = (t < _pick(slot, n0, n1))[:, None]
        if INT4 and ASM:
            # A tl.load's words go to the score dot through shared memory, a store Triton places right
            # after the load, so the tile waited for K's words there before it even issued V's loads. These
            # load in the dot's registers, and the first mma waits for them with V's loads in flight
            # (H100, 8B shape, int4: 8k 41.5 -> 39.5 us, 32k 138.9 -> 133.6 us; int8 8k 66 -> 80 us).
            return _asm_words(words, tl.broadcast_to(here, words.shape))
        # The cache is streamed once per call: don't let it push q, tables and metadata out of L2.
        return tl.load(words, mask=here, other=0, eviction_policy="evict_first")

    @triton.jit
    def _prefetch_l2(words_ptr, blk0, here0, blk1, here1, kvh, BLOCK_BYTES: tl.constexpr,
                     SLICE: tl.constexpr):
        """Starts copying the kv head's slice of pages blk0 (if here0) and blk1 (if here1) from DRAM into L2:
        two bulk prefetches from thread 0 (sm_90+). Called with the next tile's pages (and at a partition's
        start with its first tile's): a tile waits for its words' loads, and from L2 that wait is a
        fraction of DRAM's (bench/RESULTS.md, session 10)."""
        p0 = words_ptr + _slice_start(blk0, kvh, 4, BLOCK_BYTES, SLICE)
        p1 = words_ptr + _slice_start(blk1, kvh, 4, BLOCK_BYTES, SLICE)
        tl.inline_asm_elementwise(
            asm="""{
            .reg .pred p, first;
            .reg .b32 t;
            mov.u32 t, %tid.x;
            setp.eq.u32 first, t, 0;
            setp.ne.and.u32 p, $3, 0, first;
            @p cp.async.bulk.prefetch.L2.global [$1], $3;
            setp.ne.and.u32 p, $4, 0, first;
            @p cp.async.bulk.prefetch.L2.global [$2], $4;
            mov.u32 $0, 0;
            }""",
            constraints="=r,l,l,r,r", args=[p0, p1, tl.where(here0, SLICE, 0), tl.where(here1, SLICE, 0)],
            dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _k_scale_loads(half_ptr, blk0, n0, blk1, n1, kvh, T: tl.constexpr, CB: tl.constexpr, NS: tl.constexpr,
                       NC: tl.constexpr, G2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                       SLICE: tl.constexpr):
        """The K scale and zero of a tile's pages for each column j*G2+g (query head g of slot j's
        stream): [NC, HEAD_DIM] in _k_codes' channel order, as stored (zeros for an empty page)."""
        if NC <= 8:
            # Each column loads its page's pair: 16-byte loads, in the layout the scores use (H100, 8B
            # shape, int4: 8k 48.7 -> 44.3 us and 32k 175.1 -> 161.0 us against the broadcast below).
            cslot = tl.arange(0, NC) // G2
            h = _slice_start(_pick(cslot, blk0, blk1), kvh, 2, BLOCK_BYTES, SLICE) + T * CB
            h = half_ptr + h[:, None] + tl.arange(0, HEAD_DIM)[None, :]
            here = ((cslot < NS) & (_pick(cslot, n0, n1) > 0))[:, None]
            return tl.load(h, mask=here, other=0.0), tl.load(h + HEAD_DIM, mask=here, other=0.0)
        # Wider groups (one page a tile): the page's pair broadcast over the columns. The load above
        # faulted at 16 columns on the H100 (test_packed_attention's group16 shape; a compiler
        # problem, as session 5's 16-column tiles).
        ks, kz = _page_k_scales(half_ptr, blk0, n0, kvh, T, CB, HEAD_DIM, BLOCK_BYTES, SLICE)
        return tl.broadcast_to(ks[None, :], [NC, HEAD_DIM]), tl.broadcast_to(kz[None, :], [NC, HEAD_DIM])

    @triton.jit
    def _page_k_scales(half_ptr, blk, n, kvh, T: tl.constexpr, CB: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr):
        """One page's K scale and zero [HEAD_DIM] (zeros for an empty page). The halves after the codes:
        K scale [D] | K zero [D] | V scale [T] | V zero [T]."""
        h = half_ptr + _slice_start(blk, kvh, 2, BLOCK_BYTES, SLICE) + T * CB + tl.arange(0, HEAD_DIM)
        here = tl.zeros([HEAD_DIM], tl.int32) < n
        return tl.load(h, mask=here, other=0.0), tl.load(h + HEAD_DIM, mask=here, other=0.0)

    @triton.jit
    def _v_loads(words_ptr, half_ptr, blk0, n0, blk1, n1, kvh, INT4: tl.constexpr, T: tl.constexpr,
                 TP: tl.constexpr, CB: tl.constexpr, NS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr):
        """The V of a tile (as _k_code_loads): the rows' V scale and zero [NS*TP] (zero past the visible
        tokens) and code words, int8 [NS*TP, CB/4] (rows as _tile_rows), int4 [HEAD_DIM, NS*TP/8] (word j
        of a channel: tokens 8(j % (TP/8)).. of slot j // (TP/8); zero past the visible tokens)."""
        slot, t = _tile_rows(INT4, TP, NS)
        blk = _pick(slot, blk0, blk1)
        here = t < _pick(slot, n0, n1)
        if INT4:
            WP: tl.constexpr = TP // 8
            j = tl.arange(0, NS * WP)
            wslot = j // WP
            w = j % WP
            base = _slice_start(_pick(wslot, blk0, blk1), kvh, 4, BLOCK_BYTES, SLICE) + T * CB // 4
            base += w * HEAD_DIM
            vc = tl.load(words_ptr + base[None, :] + tl.arange(0, HEAD_DIM)[:, None],
                         mask=(8 * w < _pick(wslot, n0, n1))[None, :], other=0, eviction_policy="evict_first")
        else:
            base = _slice_start(blk, kvh, 4, BLOCK_BYTES, SLICE) + (T + t) * (CB // 4)
            vc = tl.load(words_ptr + base[:, None] + tl.arange(0, CB // 4)[None, :], mask=here[:, None],
                         other=0, eviction_policy="evict_first")
        h = half_ptr + _slice_start(blk, kvh, 2, BLOCK_BYTES, SLICE) + T * CB + 2 * HEAD_DIM + t
        vs = tl.load(h, mask=here, other=0.0)
        vz = tl.load(h + T, mask=here, other=0.0)
        return vc, vs, vz

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _tile_scores(qs, kc, ks, kz, n0, n1, m, INT4: tl.constexpr, TP: tl.constexpr, NS: tl.constexpr,
                     NC: tl.constexpr, G2: tl.constexpr, HEAD_DIM: tl.constexpr, F16: tl.constexpr,
                     ASM: tl.constexpr):
        """A tile's log2-scaled scores, transposed [NS*TP, NC] (-inf off each column's page and past its
        visible tokens), into the column streams' softmax: (p, alpha, m). qs [NC, D] is q * scale *
        log2(e) in float32 per column, channels in _k_codes' order (zero in unused columns); n0, n1 the
        visible tokens of the tile's pages.

        No dequantization per element: K's per-channel scale goes into q, once per page and column
        (q_s . (c*ks + kz) = (q_s*ks) . c + q_s . kz), the codes go to the dot as x = 1024 + c (float16,
        exact; float32 models: x = c) and the 1024 comes off with the zero term, from the same rounded
        q'. That per-column term (a reduction across warps) only shifts the tile's max and the exponent,
        so the dot does not wait for it. Scores are transposed (tokens as M, the few query heads as N =
        NC): no padding to 16 rows."""
        R: tl.constexpr = NS * TP
        dt = tl.float16 if F16 else tl.float32
        off = 1024.0 if F16 else 0.0
        # int4's odd channels come as 16 c.
        cs = tl.where((_code_order(INT4, HEAD_DIM) % 2 == 1) & INT4, 0.0625, 1.0)
        qk = (qs * ks.to(tl.float32) * cs[None, :]).to(dt)
        bias = tl.sum(qs * kz.to(tl.float32) - off * qk.to(tl.float32), 1)
        x = _k_codes(kc, INT4, R, HEAD_DIM, F16, ASM)
        s = tl.dot(x, tl.trans(qk), input_precision="ieee")  # [R, NC] less bias; ieee: no tf32
        slot, t = _tile_rows(INT4, TP, NS)
        valid = (slot[:, None] == tl.arange(0, NC)[None, :] // G2) & (t < _pick(slot, n0, n1))[:, None]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0) + bias)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        return tl.exp2(s - (m_safe - bias)[None, :]), tl.exp2(m - m_safe), m_new

    @triton.jit
    def _tile_values(p, alpha, vc, vs, vz, rl, rpv, rz, acc, INT4: tl.constexpr, TP: tl.constexpr,
                     NS: tl.constexpr, HEAD_DIM: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        """The tile's probabilities p [NS*TP, NC] times its V into acc [D, NC].
        V's per-token scale and zero go into p: sum_t p_t (c_t*vs_t + vz_t) = sum_t (p_t*vs_t) c_t +
        sum_t p_t*vz_t, the codes into the dot as 1024 + c (scaled by 64 while in float16, out of its
        subnormal range; int4's odd tokens come as 16 c, so their rows carry a 1/16 too). The column sums
        that finish the job (of p for l, of the rounded p*vs that takes the 1024 off, of p*vz) stay per
        row in rl, rpv, rz, rescaled with acc, for _finish_values after the loop: one reduction across
        warps a partition instead of one a tile."""
        dt = tl.float16 if F16 else tl.float32
        vs_scale = 64.0 if F16 else 1.0
        _, t = _tile_rows(INT4, TP, NS)
        row_scale = vs.to(tl.float32) * vs_scale * tl.where((t % 2 == 1) & INT4, 0.0625, 1.0)
        pv = (p * row_scale[:, None]).to(dt)
        rl = rl * alpha[None, :] + p
        rpv = rpv * alpha[None, :] + pv.to(tl.float32)
        rz = rz * alpha[None, :] + p * vz.to(tl.float32)[:, None]
        if INT4:  # words of a channel's tokens, unpacked in the dot's registers as K's are
            x = _k_codes(vc, INT4, HEAD_DIM, NS * TP, F16, ASM)
        else:
            x = tl.trans(_int8_v_codes(vc, NS * TP, HEAD_DIM, F16, ASM))
        o = tl.dot(x, pv, input_precision="ieee")
        acc = acc * alpha[None, :] + o * (1.0 / vs_scale)
        return rl, rpv, rz, acc

    @triton.jit
    def _finish_values(rl, rpv, rz, acc, F16: tl.constexpr):
        """(l, acc) from _tile_values' running rows: the column sums, the codes' 1024 off, V's zeros on."""
        off = 1024.0 if F16 else 0.0
        vs_scale = 64.0 if F16 else 1.0
        sp, spv, zv = tl.reduce((rl, rpv, rz), 0, _add3)
        return sp, acc - (off / vs_scale) * spv[None, :] + zv[None, :]

    @triton.jit
    def _quant_pages(
        q_ptr, q_cols, q_mask, scale_log2, words_ptr, half_ptr, meta_ptr, bt_row, start, count, kvh, m, l,
        acc, first_pages, FMT: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, CB: tl.constexpr,
        NS: tl.constexpr, NC: tl.constexpr, G2: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_BYTES: tl.constexpr, SLICE: tl.constexpr, STAGES: tl.constexpr, F16: tl.constexpr,
        ASM: tl.constexpr, L2: tl.constexpr,
    ):
        """The partition's quantized pages of format FMT (others count as empty), NS per tile.
        STAGES: Triton's software pipelining of the loop (1: none). first_pages: (block, metadata) of the
        partition's first two pages. The page lookups (table, then metadata: two dependent loads) run one
        tile ahead, and for int8 K's scales too; the codes load at the tile's start, V's right after them
        (V's a tile ahead, as the lookups, made int4 3x slower and int8 3% slower: bench/RESULTS.md,
        session 11)."""
        INT4: tl.constexpr = FMT == 2
        # q * scale * log2(e) per column, channels in _k_codes' order.
        qs = tl.load(q_ptr + q_cols[:, None] + _code_order(INT4, HEAD_DIM)[None, :], mask=q_mask[:, None],
                     other=0.0).to(tl.float32) * scale_log2
        # K's scales of the next tile ahead with the lookups where registers allow: int4 tiles hold twice
        # the tokens (H100, 8B shape: int8 8k 67.2 -> 64.4 us; int4 8k 44.3 -> 44.1 us but 32k 162.1 ->
        # 164.6 us, spilling).
        KSA: tl.constexpr = not INT4
        R: tl.constexpr = NS * TP
        rl = tl.where(tl.arange(0, R)[:, None] == 0, l[None, :], 0.0)  # l so far, rescaled from here on
        rpv = tl.zeros([R, NC], tl.float32)
        rz = tl.zeros([R, NC], tl.float32)
        count1 = count if NS > 1 else 0  # pages that slot 1 may take: none with one page a tile
        blk0, meta0, blk1, meta1 = first_pages
        n0 = _visible(meta0, count > 0, FMT, T)
        n1 = _visible(meta1, count1 > 1, FMT, T)
        if KSA:
            ks, kz = _k_scale_loads(half_ptr, blk0, n0, blk1, n1, kvh, T, CB, NS, NC, G2, HEAD_DIM,
                                    BLOCK_BYTES, SLICE)
        for i in tl.range(0, count, NS, num_stages=STAGES):
            # This tile's K codes at its start: a tile ahead, int4's were slower (8k 38.4 -> 39.5 us), and
            # int8's would miss the path through shared memory that unpacks them in the dot's registers.
            kc = _k_code_loads(words_ptr, blk0, n0, blk1, n1, kvh, INT4, T, TP, CB, NS, BLOCK_BYTES, SLICE,
                               ASM)
            if not KSA:
                ks, kz = _k_scale_loads(half_ptr, blk0, n0, blk1, n1, kvh, T, CB, NS, NC, G2, HEAD_DIM,
                                        BLOCK_BYTES, SLICE)
            vc, vs, vz = _v_loads(words_ptr, half_ptr, blk0, n0, blk1, n1, kvh, INT4, T, TP, CB, NS, HEAD_DIM,
                                  BLOCK_BYTES, SLICE)
            nblk0, nn0 = _page(bt_row, meta_ptr, start, i + NS, count, FMT, T)
            nblk1, nn1 = _page(bt_row, meta_ptr, start, i + NS + 1, count1, FMT, T)
            if L2:  # from the block ids alone (waiting for the metadata too was slower)
                _prefetch_l2(words_ptr, nblk0, i + NS < count, nblk1, i + NS + 1 < count1, kvh, BLOCK_BYTES,
                             SLICE)
            p, alpha, m = _tile_scores(qs, kc, ks, kz, n0, n1, m, INT4, TP, NS, NC, G2, HEAD_DIM, F16,
                                       ASM)
            if KSA:
                ks, kz = _k_scale_loads(half_ptr, nblk0, nn0, nblk1, nn1, kvh, T, CB, NS, NC, G2,
                                        HEAD_DIM, BLOCK_BYTES, SLICE)
            rl, rpv, rz, acc = _tile_values(p, alpha, vc, vs, vz, rl, rpv, rz, acc, INT4, TP, NS,
                                            HEAD_DIM, F16, ASM)
            blk0, n0, blk1, n1 = nblk0, nn0, nblk1, nn1
        l, acc = _finish_values(rl, rpv, rz, acc, F16)
        return m, l, acc

    @triton.jit
    def _streams_partition(
        q_ptr, words_ptr, half_ptr, kv_ptr, meta_ptr, bt_row, out_ptr, m_ptr, l_ptr, acc_ptr, scale_log2,
        r, kvh, part, start, end, packed, tail, sq0, sq1, so0, so1, num_heads, num_parts,
        GROUP: tl.constexpr, G2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_ITEMS: tl.constexpr, SLICE: tl.constexpr,
        T8: tl.constexpr, TP8: tl.constexpr, T4: tl.constexpr, TP4: tl.constexpr, NS: tl.constexpr,
        NC: tl.constexpr, PPP2: tl.constexpr, TILE: tl.constexpr, SINGLE: tl.constexpr,
        UPCAST: tl.constexpr, STAGES: tl.constexpr, F16: tl.constexpr,
        ASM: tl.constexpr, L2: tl.constexpr,
    ):
        """A partition with quantized pages: NS streams (page slots) per query head, as the columns of
        transposed scores [tokens, NC], combined per head at the end. Quantized pages in tiles of NS (one
        per slot), then the 16-bit tail's tokens spread over the slots."""
        cols = tl.arange(0, NC)
        slot = cols // G2
        g = cols % G2
        d = tl.arange(0, HEAD_DIM)
        q_row = q_ptr + r * sq0
        q_cols = (kvh * GROUP + g) * sq1
        q_mask = (g < GROUP) & (slot < NS)
        m = tl.full([NC], float("-inf"), tl.float32)
        l = tl.zeros([NC], tl.float32)
        acc = tl.zeros([HEAD_DIM, NC], tl.float32)

        nq = tl.minimum(end, packed) - start  # quantized pages in this partition (> 0)
        blk0 = tl.load(bt_row + start)
        blk1 = tl.load(bt_row + start + 1, mask=nq > 1, other=0)
        if L2:  # the first tile's pages on their way while the formats and q load (see _quant_pages)
            _prefetch_l2(words_ptr, blk0, nq > 0, blk1, nq > 1, kvh, BLOCK_BYTES, SLICE)
        # Looked up beside the format check: the loop's first tile needs no lookups of its own.
        first_pages = (blk0, tl.load(meta_ptr + blk0), blk1, tl.load(meta_ptr + blk1, mask=nq > 1, other=0))
        idx = tl.arange(0, PPP2)
        here = idx < nq
        fmts = tl.load(meta_ptr + tl.load(bt_row + start + idx, mask=here, other=0), mask=here, other=0) >> 8
        if tl.max(tl.where(here & (fmts == 1), 1, 0), 0) > 0:
            m, l, acc = _quant_pages(q_row, q_cols, q_mask, scale_log2, words_ptr, half_ptr, meta_ptr, bt_row,
                                     start, nq, kvh, m, l, acc, first_pages, 1, T8, TP8, HEAD_DIM, NS, NC, G2,
                                     HEAD_DIM, BLOCK_BYTES, SLICE, STAGES, F16, ASM, L2)
        if tl.max(tl.where(here & (fmts == 2), 1, 0), 0) > 0:
            m, l, acc = _quant_pages(q_row, q_cols, q_mask, scale_log2, words_ptr, half_ptr, meta_ptr, bt_row,
                                     start, nq, kvh, m, l, acc, first_pages, 2, T4, TP4, HEAD_DIM // 2, NS,
                                     NC, G2, HEAD_DIM, BLOCK_BYTES, SLICE, STAGES, F16, ASM, L2)

        # The 16-bit tail's tokens that fall in this partition's pages, token j of a tile in slot j*NS/TILE.
        rows = tl.arange(0, TILE)
        row_slot = rows // (TILE // NS)
        q = tl.load(q_row + q_cols[:, None] + d[None, :], mask=q_mask[:, None], other=0.0)  # [NC, D]
        if UPCAST:  # the CPU interpreter would matmul bf16 as raw uint16 bits
            q = q.to(tl.float32)
        tok_end = tl.minimum((end - packed) * BLOCK_SIZE, tail)
        # No software pipelining: a tail is a few pages, and its prologue would run in every program
        # (H100, 8B shape, int4: 8k 40.3 -> 39.6 us, 32k 133.9 -> 131.9 us).
        for off in tl.range(0, tok_end, TILE, num_stages=1):
            pos = off + rows
            valid = pos < tok_end
            blk = tl.load(bt_row + packed + pos // BLOCK_SIZE, mask=valid, other=0)
            tok = blk.to(tl.int64) * BLOCK_ITEMS + ((pos % BLOCK_SIZE) * NUM_KV_HEADS + kvh) * HEAD_DIM
            k = tl.load(kv_ptr + tok[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            s = tl.dot(k, tl.trans(q), input_precision="ieee") * scale_log2  # [TILE, NC]
            s = tl.where((row_slot[:, None] == slot[None, :]) & valid[:, None], s, float("-inf"))
            p, alpha, m, l = _column_softmax_step(s, m, l)
            vtok = tok + BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM
            v = tl.load(kv_ptr + vtok[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(q.dtype), input_precision="ieee")

        # Each head's streams into one (m, l, acc).
        NSL: tl.constexpr = NC // G2
        m2 = tl.reshape(m, [NSL, G2])
        mh = tl.max(m2, 0)
        w = tl.exp2(m2 - tl.where(mh == float("-inf"), 0.0, mh)[None, :])  # [NSL, G2]
        lh = tl.sum(tl.reshape(l, [NSL, G2]) * w, 0)
        acch = tl.sum(tl.reshape(acc, [HEAD_DIM, NSL, G2]) * w[None, :, :], 1)  # [D, G2]
        gh = tl.arange(0, G2)
        heads = kvh * GROUP + gh
        hmask = gh < GROUP
        if SINGLE:  # all the row's pages in this program: normalize and write the output directly
            res = acch / tl.where(lh > 0, lh, 1.0)[None, :]
            o = out_ptr + r * so0 + heads[None, :] * so1 + d[:, None]
            tl.store(o, res.to(out_ptr.dtype.element_ty), mask=hmask[None, :])
        else:
            row = (r.to(tl.int64) * num_heads + heads) * num_parts + part
            tl.store(m_ptr + row, mh, mask=hmask)
            tl.store(l_ptr + row, lh, mask=hmask)
            tl.store(acc_ptr + row[None, :] * HEAD_DIM + d[:, None], acch, mask=hmask[None, :])

    @triton.jit
    def _tail_partition(
        q_ptr, kv_ptr, bt_row, out_ptr, m_ptr, l_ptr, acc_ptr, scale_log2, r, kvh, part, start, packed, tail,
        end, sq0, sq1, so0, so1, num_heads, num_parts,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr, BLOCK_ITEMS: tl.constexpr, TILE: tl.constexpr,
        SINGLE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """A partition of 16-bit tail pages only, exactly as paged_attention's kernel (bit for bit the
        same result on 16-bit-only tables with 256-token partitions)."""
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        # Padding rows (g >= GROUP) load zeros and are never stored: tl.dot needs M >= 16.
        q = tl.load(q_ptr + r * sq0 + heads[:, None] * sq1 + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        if UPCAST:  # the CPU interpreter would matmul bf16 as raw uint16 bits
            q = q.to(tl.float32)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        tok_start = (start - packed) * BLOCK_SIZE
        tok_end = tl.minimum((end - packed) * BLOCK_SIZE, tail)
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

    @triton.jit
    def _part_pages(part, parts, num_pages, packed, PPP: tl.constexpr):
        """Pages [start, end) of a row's partition part of parts. A row with quantized pages splits them
        evenly in whole tiles (two pages), the larger partitions first, so that the SMs of one wave get even
        shares (H100, 8B shape, int4 at 8k: a row's 147 pages as 7 x 20 + 7 gave some SMs 40 tiles and the
        slowest program ended 6 us after the median; split evenly 39.2 -> 36.5 us). A row of 16-bit pages
        only goes in steps of PPP, as paged_attention's partitions (the same result bit for bit)."""
        tiles = tl.cdiv(num_pages, 2)
        per = tiles // parts
        extra = tiles % parts
        even = 2 * (part * per + tl.minimum(part, extra))
        start = tl.where(packed > 0, even, part * PPP)
        size = tl.where(packed > 0, 2 * (per + (part < extra).to(tl.int32)), PPP)
        return start, tl.minimum(start + size, num_pages)

    @triton.jit
    def _partition_kernel(
        q_ptr, words_ptr, half_ptr, kv_ptr, meta_ptr, bt_ptr, packed_ptr, tail_ptr, out_ptr,
        m_ptr, l_ptr, acc_ptr, scale_log2, sq0, sq1, sbt, so0, so1, num_heads, num_parts,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, G2: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
        BLOCK_ITEMS: tl.constexpr, SLICE: tl.constexpr, T8: tl.constexpr, TP8: tl.constexpr, T4: tl.constexpr,
        TP4: tl.constexpr, NS: tl.constexpr, NC: tl.constexpr, PPP: tl.constexpr, PPP2: tl.constexpr,
        TILE: tl.constexpr,
        SINGLE: tl.constexpr, UPCAST: tl.constexpr, STAGES: tl.constexpr,
        F16: tl.constexpr, ASM: tl.constexpr, L2: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """Row r, kv head kvh, the row's pages of partition part (_part_pages): _streams_partition where it
        has quantized pages, else _tail_partition."""
        pdl_wait(PDL)
        r = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        packed = tl.load(packed_ptr + r)
        tail = tl.load(tail_ptr + r)
        num_pages = packed + tl.cdiv(tail, BLOCK_SIZE)
        parts = tl.cdiv(num_pages, PPP)  # as the reduce kernel counts them
        if not SINGLE and part >= parts:  # past the row's pages: marked empty for the reduce kernel
            gh = tl.arange(0, G2)
            row = (r.to(tl.int64) * num_heads + kvh * GROUP + gh) * num_parts + part
            tl.store(m_ptr + row, tl.full([G2], float("-inf"), tl.float32), mask=gh < GROUP)
            return
        start, end = _part_pages(part, parts, num_pages, packed, PPP)
        bt_row = bt_ptr + r.to(tl.int64) * sbt
        if start < packed:
            _streams_partition(
                q_ptr, words_ptr, half_ptr, kv_ptr, meta_ptr, bt_row, out_ptr, m_ptr, l_ptr, acc_ptr,
                scale_log2, r, kvh, part, start, end, packed, tail, sq0, sq1, so0, so1, num_heads,
                num_parts, GROUP, G2, HEAD_DIM, BLOCK_SIZE, NUM_KV_HEADS, BLOCK_BYTES, BLOCK_ITEMS, SLICE, T8,
                TP8, T4, TP4, NS, NC, PPP2, TILE, SINGLE, UPCAST, STAGES, F16, ASM, L2)
        else:
            _tail_partition(
                q_ptr, kv_ptr, bt_row, out_ptr, m_ptr, l_ptr, acc_ptr, scale_log2, r, kvh, part, start,
                packed, tail, end, sq0, sq1, so0, so1, num_heads, num_parts, GROUP, GROUP_PAD, HEAD_DIM,
                BLOCK_SIZE, NUM_KV_HEADS, BLOCK_ITEMS, TILE, SINGLE, UPCAST)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def kernel_constants(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                     cfg: PackedConfig, single: bool, nvidia: bool, hopper: bool, cpu: bool = False) -> dict:
    """_partition_kernel's constexprs for a shape and config (nvidia: the PTX paths; hopper: sm_90+)."""
    block_bytes = 2 * block_size * num_kv_heads * head_dim * dtype.itemsize
    group = num_heads // num_kv_heads
    g2 = _pow2(group)
    t8 = tokens_per_page(FMT_INT8, block_bytes, num_kv_heads, head_dim, block_size)
    t4 = tokens_per_page(FMT_INT4, block_bytes, num_kv_heads, head_dim, block_size)
    tp8, tp4 = max(16, _pow2(t8)), max(16, _pow2(t4))
    # Page slots = pages per tile, of either format. The slots' query heads are the dots' N: kept at 8
    # where the group allows (H100: with N = 16, i.e. 2 slots of groups of 5..8 heads, the compiled
    # kernel returned garbage and faulted on the engine's demo model, 5 q heads per kv head).
    slots = min(2, max(1, cfg.tile_rows // tp4), max(1, 8 // g2))
    return dict(
        GROUP=group, GROUP_PAD=max(16, g2), G2=g2, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        NUM_KV_HEADS=num_kv_heads, BLOCK_BYTES=block_bytes, BLOCK_ITEMS=block_bytes // dtype.itemsize,
        SLICE=block_bytes // num_kv_heads, T8=t8, TP8=tp8, T4=t4, TP4=tp4, NS=slots, NC=max(8, slots * g2),
        PPP=cfg.pages_per_part, PPP2=_pow2(cfg.pages_per_part), TILE=TILE, SINGLE=single,
        UPCAST=cpu and dtype != torch.float32, STAGES=cfg.quant_stages, F16=dtype != torch.float32,
        ASM=cfg.asm and nvidia, L2=cfg.l2_prefetch and hopper,
    )


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
    assert ppp >= 1, f"pages_per_part {ppp}"
    nvidia = q.device.type == "cuda" and torch.version.hip is None
    # Grid and workspace come from shapes only, so the launch is capturable in a CUDA graph.
    num_parts = max(1, triton.cdiv(max_pages, ppp))
    single = num_parts == 1
    ws = (num_rows, num_heads, 1 if single else num_parts)
    m = torch.empty(ws, dtype=torch.float32, device=q.device)
    l = torch.empty(ws, dtype=torch.float32, device=q.device)
    acc = torch.empty((*ws, head_dim), dtype=torch.float32, device=q.device)
    hopper = nvidia and torch.cuda.get_device_capability(q.device)[0] >= 9
    constants = kernel_constants(q.dtype, num_heads, num_kv_heads, head_dim, block_size, cfg, single, nvidia,
                                 hopper, cpu=q.device.type == "cpu")
    _partition_kernel[(num_rows, num_kv_heads, num_parts)](
        q, layer_data.view(torch.int32), layer_data.view(torch.float16), layer_data.view(q.dtype), page_meta,
        block_tables, packed_pages, tail_lens, out, m, l, acc, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), num_heads, num_parts,
        **constants, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and nvidia else {}), **pdl_options(q.device),
    )
    if not single:
        paged.reduce_partitions[(num_rows, num_heads)](
            m, l, acc, tail_lens, out, out.stride(0), out.stride(1), num_heads, num_parts,
            HEAD_DIM=head_dim, PART=ppp, CHUNK=16, MARKED=True,
            **pdl_options(q.device),
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
