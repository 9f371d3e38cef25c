"""Paged decode attention: one query row per token against a block-paged KV cache.

`paged_attention_ref` is the plain-PyTorch definition of the op (and the CPU path of the engine);
`paged_attention_triton` is the GPU kernel; `paged_attention` picks one by device.
"""

import torch
from torch import Tensor

from optd.kernels.pdl import pdl_options

try:
    import triton
    import triton.language as tl

    from optd.kernels.pdl import pdl_wait
except ImportError:  # the reference path must keep working without triton
    triton = None

# Tokens per flash-decoding partition. Small enough that one sequence at a few thousand tokens already
# spreads over tens of programs per kv head; large enough that the partial results (D floats per head per
# partition) stay a small fraction of the K/V bytes read.
PARTITION_SIZE = 256
# Tokens per inner tile; independent of the cache block size so that tl.dot always sees N >= 16.
TILE = 64
# Below this many (row, kv head) pairs, partitions are one tile long: at batch 1 and a few hundred tokens
# of context, 256-token partitions give the GPU ~24 programs, each a chain of dependent loads (latency,
# not bandwidth); one-tile partitions run 4x as many in parallel for a longer reduce.
SMALL_GRID = 32


def partition_size(num_tokens: int, num_kv_heads: int) -> int:
    """Tokens per partition for a launch of this shape (shape only: the launch stays capturable)."""
    return TILE if num_tokens * num_kv_heads < SMALL_GRID else PARTITION_SIZE


def paged_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, out: Tensor | None = None,
) -> Tensor:
    num_tokens = q.shape[0]
    block_size = k_cache.shape[1]
    if q.device.type == "cpu" and num_tokens > 0:
        # Gather only as many blocks as the longest row needs (a host sync, fine off the GPU).
        max_blocks = -(-int(context_lens.max()) // block_size)
        block_tables = block_tables[:, :max_blocks]
    idx = block_tables.long()
    # [T, blocks, block_size, Hkv, D] -> [T, L, Hkv, D]: each row's K/V in logical order (fresh copies).
    k = k_cache[idx].flatten(1, 2).float()
    v = v_cache[idx].flatten(1, 2).float()
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]
    return attend_ref(q, k, v, valid, scale, out)


def attend_ref(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, out: Tensor | None = None,
) -> Tensor:
    """Attention of q [R, H, D] over each row's own float32 keys and values k, v [R, L, Hkv, D] (fresh
    copies: masked in place) where valid [R, L]; a row with no valid slot gives zeros. The references of
    this op and of kernels/packed_attention.py, once each has gathered its rows' K/V."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    # Slots past the context may hold anything, NaN included (never-written pool memory): 0 * NaN = NaN.
    k.masked_fill_(~valid[:, :, None, None], 0.0)
    v.masked_fill_(~valid[:, :, None, None], 0.0)
    qg = q.float().view(num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = (qg @ k.permute(0, 2, 3, 1)) * scale  # [R, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~valid.any(1)[:, None, None, None], 0.0)  # all -inf -> NaN -> 0
    res = (probs @ v.transpose(1, 2)).view(num_rows, num_heads, head_dim).to(q.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out

if triton is not None:

    @triton.jit
    def _tile_blocks(bt_row, off, table_tokens, TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """The cache block of each token of the tile at `off` (0 past the table's end)."""
        pos = off + tl.arange(0, TILE)
        return tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < table_tokens, other=0)

    @triton.jit
    def _partition_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, scale_log2,
        sq0, sq1, sk0, sk1, sk2, sv0, sv1, sv2, sbt, so0, so1, num_heads, num_parts, table_tokens,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        PART: tl.constexpr, TILE: tl.constexpr, SINGLE: tl.constexpr, UPCAST: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        t = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        start = part * PART
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        bt_row = bt_ptr + t.to(tl.int64) * sbt
        # The loads that don't need the context length go out with it, not after it: each dependent load
        # costs a memory latency, and at batch 1 these programs are little else. Padding rows
        # (g >= GROUP) load zeros and are never stored: tl.dot needs M >= 16.
        q = tl.load(q_ptr + t * sq0 + heads[:, None] * sq1 + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        blk = _tile_blocks(bt_row, start, table_tokens, TILE, BLOCK_SIZE)
        ctx_len = tl.load(lens_ptr + t)
        if not SINGLE and start >= ctx_len:  # the reduce kernel ignores partitions past the context
            return
        if UPCAST:  # the CPU interpreter would matmul bf16 as raw uint16 bits
            q = q.to(tl.float32)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        end = tl.minimum(start + PART, ctx_len)
        for off in range(start, end, TILE):
            pos = off + tl.arange(0, TILE)
            valid = pos < end
            # The tile may span several cache blocks: one physical block per token. V is loaded with K,
            # the next tile's blocks ahead.
            tok = blk.to(tl.int64) * sk0 + (pos % BLOCK_SIZE) * sk1 + kvh * sk2
            k = tl.load(k_ptr + tok[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            vtok = blk.to(tl.int64) * sv0 + (pos % BLOCK_SIZE) * sv1 + kvh * sv2
            v = tl.load(v_ptr + vtok[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            blk = _tile_blocks(bt_row, off + TILE, table_tokens, TILE, BLOCK_SIZE)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # ieee: no tf32 on fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
            m = m_new

        hmask = g < GROUP
        if SINGLE:  # whole context in this program: normalize and write the output directly
            res = acc / tl.where(l > 0, l, 1.0)[:, None]  # context_len 0: acc is 0 -> zeros
            o = out_ptr + t * so0 + heads[:, None] * so1 + d[None, :]
            tl.store(o, res.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        else:
            row = (t.to(tl.int64) * num_heads + heads) * num_parts + part
            tl.store(m_ptr + row, m, mask=hmask)
            tl.store(l_ptr + row, l, mask=hmask)
            tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=hmask[:, None])

    @triton.jit
    def reduce_partitions(
        m_ptr, l_ptr, acc_ptr, lens_ptr, out_ptr, so0, so1, num_heads, num_parts,
        HEAD_DIM: tl.constexpr, PART: tl.constexpr, CHUNK: tl.constexpr, MARKED: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """Combine the partitions' (m, l, acc) of a row and head into its output. A partition is PART
        tokens of lens_ptr's context; with MARKED (kernels/packed_attention.py), any of the num_parts,
        those past the row's end marked m = -inf and their l and acc (never written) ignored: no length
        to load before the partitions, one dependent load less."""
        pdl_wait(PDL)
        t = tl.program_id(0)
        h = tl.program_id(1)
        n_valid = num_parts if MARKED else tl.cdiv(tl.load(lens_ptr + t), PART)
        base = (t.to(tl.int64) * num_heads + h) * num_parts
        d = tl.arange(0, HEAD_DIM)
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        # Online rescaling over chunks of partitions, so long contexts never need a huge register tile.
        for c in range(0, n_valid, CHUNK):
            p = c + tl.arange(0, CHUNK)
            pm = p < n_valid
            mp = tl.load(m_ptr + base + p, mask=pm, other=float("-inf"))
            lp = tl.load(l_ptr + base + p, mask=pm, other=0.0)
            ap = tl.load(acc_ptr + (base + p)[:, None] * HEAD_DIM + d[None, :], mask=pm[:, None], other=0.0)
            m_new = tl.maximum(m, tl.max(mp, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # partitions without a visible token
            seen = mp > float("-inf")  # the others' l and acc are 0, or never written (MARKED)
            w = tl.where(seen, tl.exp2(mp - m_safe), 0.0)
            alpha = tl.exp2(m - m_safe)
            l = l * alpha + tl.sum(w * tl.where(seen, lp, 0.0), 0)
            acc = acc * alpha + tl.sum(w[:, None] * tl.where(seen[:, None], ap, 0.0), 0)
            m = m_new
        res = acc / tl.where(l > 0, l, 1.0)  # no visible token: acc is 0 -> zeros
        tl.store(out_ptr + t * so0 + h * so1 + d, res.to(out_ptr.dtype.element_ty))


def paged_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, out: Tensor | None = None, part: int | None = None,
) -> Tensor:
    """part: tokens per partition, a multiple of TILE (default: partition_size() for the shape)."""
    assert triton is not None, "paged_attention_triton needs triton; use paged_attention_ref"
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of kv heads {num_kv_heads}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim} is not a power of 2 >= 16"
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1, "head_dim must be the contiguous dim"
    assert v_cache.shape == k_cache.shape and block_tables.shape[0] == context_lens.shape[0] == num_tokens
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.stride(2) == 1, "out must be [num_tokens, num_heads, head_dim]"
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    # Grid and workspace come from shapes only, so the launch is capturable in a CUDA graph.
    part = part or partition_size(num_tokens, num_kv_heads)
    assert part % TILE == 0, f"partition of {part} tokens is not a multiple of the {TILE}-token tile"
    num_parts = triton.cdiv(block_tables.shape[1] * block_size, part)
    single = num_parts == 1
    ws = (num_tokens, num_heads, 1 if single else num_parts)
    m = torch.empty(ws, dtype=torch.float32, device=q.device)
    l = torch.empty(ws, dtype=torch.float32, device=q.device)
    acc = torch.empty((*ws, head_dim), dtype=torch.float32, device=q.device)
    _partition_kernel[(num_tokens, num_kv_heads, num_parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), num_heads, num_parts, block_tables.shape[1] * block_size,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, PART=part, TILE=TILE, SINGLE=single,
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16, **pdl_options(q.device),
    )
    if not single:
        reduce_partitions[(num_tokens, num_heads)](
            m, l, acc, context_lens, out, out.stride(0), out.stride(1), num_heads, num_parts,
            HEAD_DIM=head_dim, PART=part, CHUNK=16, MARKED=False,
            **pdl_options(q.device),
        )
    return out


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, out: Tensor | None = None,
) -> Tensor:
    # ROCm builds of torch report their GPUs as device type "cuda" too.
    if q.device.type == "cuda" and triton is not None:
        return paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out)
