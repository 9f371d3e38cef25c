"""Rotary position embedding of q and k, fused with the write of k and v into the paged KV cache.

`rope_and_cache_ref` is the plain-PyTorch definition of the op (Hugging Face's rotate-half RoPE in the
activations' dtype, rounding included) and the CPU path of the engine; `rope_and_cache_triton` is the
GPU kernel; `rope_and_cache` picks one by device. Both work in place and return None:
- q and k are overwritten with their rotated values (they may be strided views of one qkv tensor);
- rotated k and v are written to k_cache/v_cache [num_blocks, block_size, Hkv, D] at slot_mapping[t]
  (block slot // block_size, offset slot % block_size); every other cache slot is left untouched.
Every slot must be valid (0 <= slot < num_blocks * block_size) and distinct within a call.
"""

import torch
from torch import Tensor

from optd.kernels.pdl import pdl_options
from optd.kernels.rmsnorm import round_code

try:
    import triton
    import triton.language as tl

    from optd.kernels.pdl import pdl_wait
    from optd.kernels.rmsnorm import round_to
except ImportError:  # the reference path must keep working without triton
    triton = None

# Head dims the kernel supports: powers of two in this range (one head's half is one register tile).
MIN_HEAD_DIM, MAX_HEAD_DIM = 64, 256


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [T, heads, D]; cos/sin: [T, D] with halves duplicated; each op rounds in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_and_cache_ref(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor,
    k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
) -> None:
    cos, sin = cos_table[positions], sin_table[positions]
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


if triton is not None:

    @triton.jit
    def _rotate_half(x1, x2, c1, s1, c2, s2, ROUND: tl.constexpr):
        """[x1 | x2] * [c1 | c2] + [-x2 | x1] * [s1 | s2], rounding each product and sum like PyTorch."""
        o1 = round_to(round_to(x1 * c1, ROUND) - round_to(x2 * s1, ROUND), ROUND)
        o2 = round_to(round_to(x2 * c2, ROUND) + round_to(x1 * s2, ROUND), ROUND)
        return o1, o2

    @triton.jit
    def _rope_and_cache_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
        sq0, sq1, sk0, sk1, sv0, sv1, scos, ssin, skc0, skc1, skc2, svc0, svc1, svc2,
        HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
        HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + pos * scos + d).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + pos * scos + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + pos * ssin + d).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + pos * ssin + HALF + d).to(tl.float32)[None, :]

        hq = tl.arange(0, HQ_PAD)
        mq = (hq < HQ)[:, None]
        qp = q_ptr + t * sq0 + hq[:, None] * sq1 + d[None, :]
        q1 = tl.load(qp, mask=mq, other=0.0).to(tl.float32)
        q2 = tl.load(qp + HALF, mask=mq, other=0.0).to(tl.float32)
        q1, q2 = _rotate_half(q1, q2, c1, s1, c2, s2, ROUND)
        tl.store(qp, q1.to(q_ptr.dtype.element_ty), mask=mq)
        tl.store(qp + HALF, q2.to(q_ptr.dtype.element_ty), mask=mq)

        hk = tl.arange(0, HKV_PAD)
        mk = (hk < HKV)[:, None]
        kp = k_ptr + t * sk0 + hk[:, None] * sk1 + d[None, :]
        k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
        k1, k2 = _rotate_half(k1, k2, c1, s1, c2, s2, ROUND)
        k1 = k1.to(k_ptr.dtype.element_ty)
        k2 = k2.to(k_ptr.dtype.element_ty)
        tl.store(kp, k1, mask=mk)
        tl.store(kp + HALF, k2, mask=mk)

        slot = tl.load(slot_ptr + t).to(tl.int64)
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        kcp = kc_ptr + blk * skc0 + off * skc1 + hk[:, None] * skc2 + d[None, :]
        tl.store(kcp, k1.to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(kcp + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mk)
        dv = tl.arange(0, 2 * HALF)
        vals = tl.load(v_ptr + t * sv0 + hk[:, None] * sv1 + dv[None, :], mask=mk)
        vcp = vc_ptr + blk * svc0 + off * svc1 + hk[:, None] * svc2 + dv[None, :]
        tl.store(vcp, vals.to(vc_ptr.dtype.element_ty), mask=mk)


def rope_and_cache_triton(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor,
    k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
) -> None:
    assert triton is not None, "rope_and_cache_triton needs triton; use rope_and_cache_ref"
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0, (
        f"rope_and_cache_triton: head_dim {head_dim} must be a power of two in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    )
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim), "k and v must be [T, Hkv, D]"
    assert cos_table.shape == sin_table.shape and cos_table.shape[1] == head_dim, "tables must be [P, D]"
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim), (
        "caches must be [num_blocks, block_size, Hkv, D]"
    )
    dtypes = {t.dtype for t in (q, k, v, cos_table, sin_table, k_cache, v_cache)}
    assert len(dtypes) == 1, f"q, k, v, the cos/sin tables and the caches must share one dtype, got {dtypes}"
    assert positions.shape == slot_mapping.shape == (num_tokens,)
    for name, t in (("q", q), ("k", k), ("v", v), ("cos_table", cos_table), ("sin_table", sin_table),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name}'s last dim (head_dim) must be contiguous"
    if num_tokens == 0:
        return
    pad_q, pad_kv = triton.next_power_of_2(num_heads), triton.next_power_of_2(num_kv_heads)
    _rope_and_cache_kernel[(num_tokens,)](
        q, k, v, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_table.stride(0), sin_table.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        HQ=num_heads, HKV=num_kv_heads, HQ_PAD=pad_q, HKV_PAD=pad_kv, HALF=head_dim // 2,
        BLOCK_SIZE=k_cache.shape[1], ROUND=round_code(q.dtype),
        num_warps=4 if pad_q * head_dim <= 4096 else 8,
        enable_fp_fusion=False,  # x*cos + r*sin must round the products like PyTorch, not fuse to an fma
        **pdl_options(q.device),
    )


def rope_and_cache(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor,
    k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
) -> None:
    args = (q, k, v, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping)
    # ROCm builds of torch report their GPUs as device type "cuda" too. Head dims outside the kernel's
    # range (tiny test models) take the reference path rather than refusing the model.
    head_dim = q.shape[-1]
    supported = MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0
    if q.device.type == "cuda" and triton is not None and supported:
        return rope_and_cache_triton(*args)
    return rope_and_cache_ref(*args)
