import pytest
import torch

from optd.kernels.kv_pages import (
    FMT_INT4,
    FMT_INT8,
    FMT_NATIVE,
    encode_meta,
    error_bound,
    pack_pages,
    tokens_per_page,
    unpack_pages,
)


def block_bytes(block_size, num_kv_heads, head_dim, dtype):
    return 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


def random_kv(num_pages, n, num_kv_heads, head_dim, dtype, seed):
    """Keys with outlier channels (what per-channel key scales are for), values with an outlier token."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_pages, n, num_kv_heads, head_dim, generator=g)
    k[..., 3] = k[..., 3] * 40 + 15
    k[..., head_dim - 1] *= 0.01
    v = torch.randn(num_pages, n, num_kv_heads, head_dim, generator=g)
    v[:, n // 2] *= 30
    return k.to(dtype), v.to(dtype)


def test_tokens_per_page_examples():
    # bf16, block_size 16, 8 kv heads: the figures the engine's capacity planning relies on.
    for head_dim, t8, t4 in [(64, 29, 56), (128, 29, 56)]:  # int4 rounds 58 down to whole V words
        bb = block_bytes(16, 8, head_dim, torch.bfloat16)
        assert tokens_per_page(FMT_INT8, bb, 8, head_dim, 16) == t8
        assert tokens_per_page(FMT_INT4, bb, 8, head_dim, 16) == t4
        assert tokens_per_page(FMT_NATIVE, bb, 8, head_dim, 16) == 16
    with pytest.raises(ValueError, match="metadata"):  # ntok must fit 8 bits
        tokens_per_page(FMT_INT4, block_bytes(128, 2, 64, torch.float32), 2, 64, 128)
    assert encode_meta(FMT_INT4, 7) == 2 * 256 + 7 and encode_meta(FMT_NATIVE, 16) == 0


@pytest.mark.parametrize("fmt", [FMT_INT8, FMT_INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_pack_unpack_within_bound(fmt, dtype, partial):
    num_kv_heads, head_dim, block_size = 2, 64, 16
    bb = block_bytes(block_size, num_kv_heads, head_dim, dtype)
    t = tokens_per_page(fmt, bb, num_kv_heads, head_dim, block_size)
    n = t // 3 if partial else t
    k, v = random_kv(5, n, num_kv_heads, head_dim, dtype, seed=fmt * 10 + partial)
    data = pack_pages(k, v, fmt, bb)
    assert data.shape == (5, bb) and data.dtype == torch.uint8
    k2, v2 = unpack_pages(data, fmt, n, num_kv_heads, head_dim, dtype)
    kb, vb = error_bound(k, v, fmt)
    k_err, v_err = (k2 - k.float()).abs(), (v2 - v.float()).abs()
    assert (k_err <= kb).all() and (v_err <= vb).all()
    # The bound is a half step, not slack: the error reaches a good part of it somewhere.
    assert (k_err / kb).max() > 0.5 and (v_err / vb).max() > 0.5
    # int4 steps are 17x int8's: the bound tracks the format.
    qmax = 255 if fmt == FMT_INT8 else 15
    assert torch.allclose(vb.squeeze(-1), (v.float().amax(-1) - v.float().amin(-1)) / qmax / 2, rtol=0.01)
    # Slots past n are zero (codes, V scale and zero): unpacked, their K is the channel's zero point.
    if partial:
        k_all, v_all = unpack_pages(data, fmt, t, num_kv_heads, head_dim, dtype)
        assert torch.equal(k_all[:, :n], k2) and (k_all[:, n:] == k_all[:, n:n + 1]).all()
        assert (v_all[:, n:] == 0).all()


def decode_by_hand(slice_bytes, fmt, t, head_dim, tok, d):
    """K and V of (tok, channel d) from one head's slice, straight from the format's byte offsets."""
    cb = head_dim if fmt == FMT_INT8 else head_dim // 2

    def f16(off):
        return float(slice_bytes[off : off + 2].view(torch.float16))

    def code(base, channel_major=False):
        if fmt == FMT_INT8:
            return int(slice_bytes[base + tok * cb + d])
        if channel_major:  # int4 V: a 4-byte word per 8 tokens and channel, [t / 8, D] of them
            byte = int(slice_bytes[base + 4 * (tok // 8 * head_dim + d) + tok % 8 // 2])
            return byte & 15 if tok % 2 == 0 else byte >> 4
        byte = int(slice_bytes[base + tok * cb + d // 2])
        return byte & 15 if d % 2 == 0 else byte >> 4

    halves = 2 * t * cb
    pos = d
    if fmt == FMT_INT4:  # K scale and zero in the kernel's order: 8c + 4b + 2h + a at 16h + 4c + 2a + b
        base, c, b, h, a = d // 32 * 32, d % 32 // 8, d % 8 // 4, d % 4 // 2, d % 2
        pos = base + 16 * h + 4 * c + 2 * a + b
    k_scale, k_zero = f16(halves + 2 * pos), f16(halves + 2 * head_dim + 2 * pos)
    v_scale, v_zero = f16(halves + 4 * head_dim + 2 * tok), f16(halves + 4 * head_dim + 2 * t + 2 * tok)
    return code(0) * k_scale + k_zero, code(t * cb, channel_major=True) * v_scale + v_zero


def test_layout_matches_contract():
    num_kv_heads, head_dim, block_size, dtype = 4, 32, 16, torch.bfloat16
    bb = block_bytes(block_size, num_kv_heads, head_dim, dtype)
    s = bb // num_kv_heads
    for fmt, cb in [(FMT_INT8, head_dim), (FMT_INT4, head_dim // 2)]:
        t = tokens_per_page(fmt, bb, num_kv_heads, head_dim, block_size)
        fits = (s - 4 * head_dim) // (2 * cb + 4)
        assert t == (fits if fmt == FMT_INT8 else fits - fits % 8)
        n = t - 3
        k, v = random_kv(3, n, num_kv_heads, head_dim, dtype, seed=7)
        data = pack_pages(k, v, fmt, bb)
        k2, v2 = unpack_pages(data, fmt, n, num_kv_heads, head_dim, dtype)
        page, h = 2, 3
        sl = data[page, h * s : (h + 1) * s]
        for tok in (0, 1, n - 1):
            for d in (0, 5, head_dim - 1):
                k_hand, v_hand = decode_by_hand(sl, fmt, t, head_dim, tok, d)
                assert k2[page, tok, h, d] == pytest.approx(k_hand, rel=1e-6, abs=1e-6)
                assert v2[page, tok, h, d] == pytest.approx(v_hand, rel=1e-6, abs=1e-6)
        # Unused token slots (codes, V scale and zero) and the bytes after the layout are zero.
        assert (sl[n * cb : t * cb] == 0).all()
        v_codes = sl[t * cb : 2 * t * cb]
        if fmt == FMT_INT4:  # [t / 8, D, 4]: n = 8w + 5 leaves token 8w + 5's high nibble, then bytes 3..
            assert n % 8 == 5
            v_codes = v_codes.view(t // 8, head_dim, 4)
            assert (v_codes[n // 8, :, 2] >> 4 == 0).all() and (v_codes[n // 8, :, 3] == 0).all()
            assert (v_codes[n // 8 + 1 :] == 0).all()
        else:
            assert (v_codes[n * cb :] == 0).all()
        vs_end = 2 * t * cb + 4 * head_dim
        assert (sl[vs_end + 2 * n : vs_end + 2 * t] == 0).all() and (sl[vs_end + 2 * t + 2 * n :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_native_round_trips_exactly(dtype):
    num_kv_heads, head_dim, block_size = 2, 64, 16
    bb = block_bytes(block_size, num_kv_heads, head_dim, dtype)
    k, v = random_kv(3, 11, num_kv_heads, head_dim, dtype, seed=3)
    data = pack_pages(k, v, FMT_NATIVE, bb)
    # The pool's own view of a native page: [2, block_size, Hkv, D], K then V.
    view = data.view(dtype).view(3, 2, block_size, num_kv_heads, head_dim)
    assert torch.equal(view[:, 0, :11], k) and torch.equal(view[:, 1, :11], v)
    k2, v2 = unpack_pages(data, FMT_NATIVE, 11, num_kv_heads, head_dim, dtype)
    assert torch.equal(k2, k.float()) and torch.equal(v2, v.float())


@pytest.mark.parametrize("fmt", [FMT_INT8, FMT_INT4], ids=["int8", "int4"])
def test_constant_and_extreme_inputs(fmt):
    """A constant channel or token (zero range) is exact, and tiny or large magnitudes keep the bound."""
    num_kv_heads, head_dim = 1, 16
    bb = block_bytes(16, num_kv_heads, head_dim, torch.float32)
    k = torch.full((2, 8, num_kv_heads, head_dim), 0.3)
    v = torch.full((2, 8, num_kv_heads, head_dim), -2.5)
    k[1] = torch.linspace(-1e-6, 1e-6, 8)[:, None, None]
    v[1] = torch.linspace(-3000.0, 5000.0, head_dim)
    k2, v2 = unpack_pages(pack_pages(k, v, fmt, bb), fmt, 8, num_kv_heads, head_dim, torch.float32)
    assert not k2.isnan().any() and not v2.isnan().any()
    kb, vb = error_bound(k, v, fmt)
    assert ((k2 - k).abs() <= kb).all() and ((v2 - v).abs() <= vb).all()
    assert (k2[0] - 0.3).abs().max() < 1e-3 and (v2[0] + 2.5).abs().max() < 2e-3


def test_pack_rejects_too_many_tokens():
    bb = block_bytes(16, 2, 64, torch.bfloat16)
    k = torch.zeros(1, 57, 2, 64)
    with pytest.raises(ValueError, match="do not fit"):
        pack_pages(k, k, FMT_INT4, bb)
    with pytest.raises(ValueError, match="do not fit"):
        pack_pages(k[:, :17].bfloat16(), k[:, :17].bfloat16(), FMT_NATIVE, bb)
