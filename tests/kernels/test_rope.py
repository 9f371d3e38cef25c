import pytest
import torch

from optd.kernels.rope import rope_and_cache, rope_and_cache_ref, rope_and_cache_triton
from tests.kernels.test_rmsnorm import DEVICE, DTYPES, needs_triton

MAX_POS = 4096


def rope_tables(head_dim, dtype, theta=500000.0):
    """cos/sin per position with halves duplicated, float32 then cast (as LlamaModel.init_rope)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Case:
    """A random batch as the engine builds it: q/k/v strided views of one qkv projection output, K and V
    of a block interleaved in one pool, a shuffled slot mapping over distinct slots."""

    def __init__(self, T, Hq, Hkv, D, block_size, dtype, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.shape = (T, Hq, Hkv, D, block_size)
        self.qkv = (torch.randn(T, (Hq + 2 * Hkv) * D, generator=g) * 2).to(dtype).to(device)
        self.num_blocks = T // block_size + 3
        self.pool = torch.randn(self.num_blocks, 2, block_size, Hkv, D, generator=g).to(dtype).to(device)
        self.positions = torch.randint(0, MAX_POS, (T,), generator=g).to(device)
        if T > 1:
            self.positions[0] = 0  # cos 1, sin 0
        slots = torch.randperm(self.num_blocks * block_size, generator=g)[:T]
        self.slot_mapping = slots.to(device)
        cos, sin = rope_tables(D, dtype)
        self.cos, self.sin = cos.to(device), sin.to(device)

    def clone(self):
        c = object.__new__(Case)
        c.__dict__.update(self.__dict__)
        c.qkv, c.pool = self.qkv.clone(), self.pool.clone()
        return c

    def views(self):
        T, Hq, Hkv, D, _ = self.shape
        q, k, v = self.qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)

    def args(self):
        q, k, v = self.views()
        kv = self.pool
        return q, k, v, self.positions, self.cos, self.sin, kv[:, 0], kv[:, 1], self.slot_mapping


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    case = Case(T=7, Hq=4, Hkv=2, D=64, block_size=4, dtype=dtype, seed=3)
    before = case.clone()
    rope_and_cache_ref(*case.args())
    q0, k0, v0 = before.views()
    cos, sin = case.cos[case.positions], case.sin[case.positions]
    want_q, want_k = apply_rotary_pos_emb(q0, k0, cos, sin, unsqueeze_dim=1)  # [T, heads, D] layout
    q, k, v = case.views()
    assert torch.equal(q, want_q) and torch.equal(k, want_k), "q and k must be rotated in place"
    assert torch.equal(v, v0), "v must not change"
    # Cache: the written slots hold rotated k and v; every other slot of the pool is untouched.
    bs = case.shape[4]
    touched = torch.zeros(case.num_blocks, bs, dtype=torch.bool)
    for t, slot in enumerate(case.slot_mapping.tolist()):
        assert torch.equal(case.pool[slot // bs, 0, slot % bs], want_k[t])
        assert torch.equal(case.pool[slot // bs, 1, slot % bs], v0[t])
        touched[slot // bs, slot % bs] = True
    untouched = ~touched
    assert torch.equal(case.pool.transpose(1, 2)[untouched], before.pool.transpose(1, 2)[untouched])


CASES = [  # T, Hq, Hkv, D, block_size
    (1, 32, 8, 128, 16),   # Llama 3 8B decode
    (5, 4, 4, 64, 8),      # MHA
    (3, 6, 3, 128, 4),     # head counts not powers of two
    (4, 8, 1, 256, 16),    # head_dim 256, one kv head
    (64 if DEVICE == "cuda" else 16, 32, 8, 128, 16),  # Llama 3 8B, a small prefill (CI: fewer tokens)
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda c: f"T{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-bs{c[4]}")
def test_triton_matches_reference(shape, dtype):
    case = Case(*shape, dtype=dtype, seed=sum(shape), device=DEVICE)
    ref = case.clone()
    assert rope_and_cache_triton(*case.args()) is None
    rope_and_cache_ref(*ref.args())
    # Elementwise products and sums rounded exactly as PyTorch rounds them: bit-exact in every dtype,
    # both the in-place q/k (and untouched v) in the qkv buffer and the whole pool.
    assert torch.equal(case.qkv, ref.qkv)
    assert torch.equal(case.pool, ref.pool)
    assert not torch.equal(case.qkv, Case(*shape, dtype=dtype, seed=sum(shape), device=DEVICE).qkv)


@needs_triton
def test_triton_rejects_bad_head_dim():
    case = Case(T=2, Hq=2, Hkv=1, D=96, block_size=4, dtype=torch.float32)
    with pytest.raises(AssertionError, match="head_dim 96 must be a power of two"):
        rope_and_cache_triton(*case.args())


@needs_triton
def test_triton_empty_and_dispatch():
    case = Case(T=0, Hq=2, Hkv=1, D=64, block_size=4, dtype=torch.float16)
    before = case.clone()
    rope_and_cache_triton(*case.args())
    assert torch.equal(case.pool, before.pool)
    case = Case(T=3, Hq=2, Hkv=1, D=64, block_size=4, dtype=torch.float32)
    ref = case.clone()
    rope_and_cache(*case.args())  # CPU tensors: the reference
    rope_and_cache_ref(*ref.args())
    assert torch.equal(case.qkv, ref.qkv) and torch.equal(case.pool, ref.pool)
