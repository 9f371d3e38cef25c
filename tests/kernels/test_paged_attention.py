import pytest
import torch

from optd.kernels.paged_attention import (
    PARTITION_SIZE,
    TILE,
    paged_attention,
    paged_attention_ref,
    paged_attention_triton,
)
from tests.kernels.test_rmsnorm import DEVICE, needs_triton


def make_inputs(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random paged batch; every cache slot a row must not read (past its context) holds NaN."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // block_size) + 1  # one spare column of garbage entries
    num_blocks = len(lens) * max_blocks + 1
    # K and V of a block interleaved in one pool, as the engine stores them: strided views.
    pool = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    pool[0] = float("nan")  # block 0 is the target of every unused block-table entry
    # Distinct physical blocks in shuffled order.
    block_tables = (torch.randperm(num_blocks - 1, generator=g) + 1).view(len(lens), max_blocks)
    for i, n in enumerate(lens):
        used = -(-n // block_size)
        block_tables[i, used:] = 0
        if n % block_size:  # tail of the last block, not yet written
            pool[block_tables[i, used - 1], :, n % block_size :] = float("nan")
    # q as a slice of a wider projection output, so its row stride is not num_heads * head_dim.
    qkv = torch.randn(len(lens), num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    q = qkv[:, :num_heads]
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return q, pool[:, 0], pool[:, 1], block_tables.to(torch.int32), lens_t, head_dim**-0.5


def on_device(args):
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


def naive(q, k_cache, v_cache, block_tables, context_lens, scale):
    """One row at a time: gather the row's K/V in order and apply the textbook formula."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(num_tokens, num_heads, head_dim)
    for i in range(num_tokens):
        n = int(context_lens[i])
        if n == 0:
            continue
        blocks = block_tables[i, : -(-n // block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        for h in range(num_heads):
            kvh = h // (num_heads // num_kv_heads)
            p = torch.softmax(q[i, h].float() @ k[:, kvh].T * scale, dim=-1)
            out[i, h] = p @ v[:, kvh]
    return out


LONG = 2 * PARTITION_SIZE + 190  # spans three partitions

CASES = [  # (context lens, num_heads, num_kv_heads, head_dim, block_size)
    ([1, LONG, 0, 37], 4, 4, 64, 16),
    ([LONG, 5, 300], 4, 2, 64, 8),
    ([PARTITION_SIZE, PARTITION_SIZE + 1, 0, 1], 8, 2, 64, 32),
    ([17, LONG], 8, 1, 128, 16),
    ([3, 90, 0], 8, 2, 64, 32),  # a single partition: no reduce kernel
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-bs{c[4]}")
def test_reference_matches_naive(case):
    args = make_inputs(*case, dtype=torch.float32)
    got = paged_attention_ref(*args)
    want = naive(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("part", [TILE, PARTITION_SIZE])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-bs{c[4]}")
def test_triton_matches_reference_fp32(case, part):
    args = on_device(make_inputs(*case, dtype=torch.float32, seed=1))
    got = paged_attention_triton(*args, part=part)
    assert not got.isnan().any()
    torch.testing.assert_close(got, paged_attention_ref(*args), atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_long_context_peak_in_last_partition():
    # Enough partitions that the reduce kernel rescales across chunks, with the largest scores last.
    n, block_size = 17 * PARTITION_SIZE + 50, 128
    q, k, v, block_tables, lens, scale = make_inputs([n, 3], 2, 1, 64, block_size, dtype=torch.float32)
    pos = torch.arange(n - 40, n)
    k[block_tables[0, pos // block_size].long(), pos % block_size, 0] = q[0, 0]
    args = on_device((q, k, v, block_tables, lens, scale))
    got = paged_attention_triton(*args, part=PARTITION_SIZE)
    torch.testing.assert_close(got, paged_attention_ref(*args), atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_half(dtype):
    args = on_device(make_inputs([LONG, 0, 45], 8, 2, 64, 16, dtype=dtype, seed=2))
    got = paged_attention_triton(*args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), paged_attention_ref(*args).float(), atol=2e-2, rtol=2e-2)


@needs_triton
def test_triton_writes_into_strided_out():
    q, k, v, *rest = on_device(make_inputs([LONG, 0, 9], 4, 2, 64, 16, dtype=torch.float32, seed=3))
    v = v.contiguous()  # K and V with different strides
    buf = torch.full((3, 4, 2 * 64), 7.0, device=DEVICE)
    out = buf[:, :, :64]  # non-contiguous destination; the other half must stay untouched
    ret = paged_attention_triton(q, k, v, *rest, out=out)
    assert ret is out
    torch.testing.assert_close(out, paged_attention_ref(q, k, v, *rest), atol=1e-4, rtol=1e-4)
    assert (buf[:, :, 64:] == 7.0).all() and (out[1] == 0).all()


def test_dispatch_uses_reference_on_cpu():
    args = make_inputs([20, 0], 4, 2, 64, 8, dtype=torch.float32)
    out = torch.empty(2, 4, 64)
    assert paged_attention(*args, out=out) is out
    assert torch.equal(out, paged_attention_ref(*args))


@needs_triton
def test_triton_rejects_non_power_of_two_head_dim():
    args = on_device(make_inputs([5], 2, 1, 48, 8, dtype=torch.float32))
    with pytest.raises(AssertionError, match="power of 2"):
        paged_attention_triton(*args)
