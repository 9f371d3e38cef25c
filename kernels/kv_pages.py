"""KV page formats: how one (layer, block) row of the pool's bytes holds K and V.

Every format fills the same `block_bytes` (= 2 * block_size * Hkv * D * itemsize of the model dtype), so
pages of any format share one pool and one allocator; a quantized page just holds more tokens.

- FMT_NATIVE (0): the 16-bit cache, the row viewed as dtype [2, block_size, Hkv, D] (K then V).
- FMT_INT8 (1), FMT_INT4 (2): KIVI-style, asymmetric, unsigned codes, no calibration. The row is split
  into Hkv head slices of S = block_bytes // Hkv bytes (head h at h * S). With cb code bytes per token
  (D for int8; D // 2 for int4), a slice holds T = (S - 4D) // (2cb + 4) tokens (int4: rounded down to
  a multiple of 8) as
      K codes [T, cb] | V codes [T * cb] | K scale [D] f16 | K zero [D] f16 | V scale [T] f16 | V zero [T] f16
  int8 V codes are [T, D], like K's. int4 K codes pack a token's channels (even channel d in the low
  nibble of byte d // 2, odd in the high). int4 V codes pack a channel's tokens instead, 8 to a 32-bit
  word, as [T // 8, D] words: word (w, d) holds channel d of tokens 8w..8w+7, token 8w + j in byte
  j // 2 (even j in the low nibble). The attention kernel's value dot reduces over tokens, so such a
  word unpacks straight into its operand, as a word of K's channels does for the score dot.
  Keys are quantized per channel over the page's tokens (their outlier channels stay confined to their
  own scale), values per token over its channels. x ≈ code * scale + zero. Unused token slots are zero.
  K scale and zero are stored in `k_channel_order` (int4: the order the attention kernel's dots see the
  channels in, so it loads them contiguously; int8: channel order).
- Page metadata, per block id and shared by all layers: int32 fmt * 256 + ntok for quantized pages, 0 for
  native ones (their valid count is the sequence's).

Error bound: the zero point is the minimum rounded *down* to float16 and the scale (max - zero) / qmax
rounded *up*, so codes never clip and |x - dequantized| <= scale / 2 for every element (up to float32
rounding of the dequantization). Values beyond float16's range saturate (the bound then fails; K/V of
real models stay far inside it). `error_bound` states the bound from the input's ranges.

Plain torch, vectorized over pages, on any device; the engine packs [layers * pages, ...] at once.
"""

import torch
from torch import Tensor

FMT_NATIVE = 0
FMT_INT8 = 1
FMT_INT4 = 2
QMAX = {FMT_INT8: 255, FMT_INT4: 15}
MAX_NTOK = 255  # ntok lives in the low 8 bits of the page metadata
INT4_V_WORD_TOKENS = 8  # int4 V: one channel's codes of 8 tokens to a 32-bit word

_F16_MAX = 65504.0
_F16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


def code_bytes(fmt: int, head_dim: int) -> int:
    """Bytes of one token's codes for one head."""
    return head_dim if fmt == FMT_INT8 else head_dim // 2


def tokens_per_page(fmt: int, block_bytes: int, num_kv_heads: int, head_dim: int, block_size: int) -> int:
    """Tokens one page of format `fmt` holds (block_size for native pages)."""
    if fmt == FMT_NATIVE:
        return block_size
    if fmt not in QMAX:
        raise ValueError(f"unknown KV page format {fmt}")
    if block_bytes % num_kv_heads or head_dim % 2:
        raise ValueError(f"block_bytes {block_bytes} / {num_kv_heads} heads, head_dim {head_dim}: no layout")
    slice_bytes = block_bytes // num_kv_heads
    t = (slice_bytes - 4 * head_dim) // (2 * code_bytes(fmt, head_dim) + 4)
    if fmt == FMT_INT4:
        t -= t % INT4_V_WORD_TOKENS  # whole words
    if not 0 < t <= MAX_NTOK:
        raise ValueError(f"format {fmt} holds {t} tokens per page; the metadata allows 1..{MAX_NTOK}")
    return t


def k_channel_order(fmt: int, head_dim: int) -> Tensor:
    """The channel held at each position of a page's K scale and zero. int4 with a power-of-2 head_dim
    >= 16: in each run of 8 * RUN channels (RUN = 4, or 2 when head_dim is 16), position 4 RUN h + 4c +
    2a + b holds channel 8c + 4b + 2h + a (kernels/packed_attention.py's _code_order); otherwise the
    identity."""
    p = torch.arange(head_dim)
    if fmt != FMT_INT4 or head_dim < 16 or head_dim & (head_dim - 1):
        return p
    run = 4 if head_dim >= 32 else head_dim // 8
    return (p // (8 * run) * (8 * run) + (p // 4) % run * 8 + p % 2 * 4 + (p // (4 * run)) % 2 * 2
            + (p // 2) % 2)


def encode_meta(fmt: int | Tensor, ntok: int | Tensor) -> int | Tensor:
    """Page metadata: fmt * 256 + ntok for quantized pages, 0 for native ones."""
    if isinstance(fmt, Tensor):
        return torch.where(fmt == FMT_NATIVE, 0, fmt * 256 + ntok)
    return 0 if fmt == FMT_NATIVE else fmt * 256 + ntok


def _layout(fmt: int, block_bytes: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(slice bytes S, tokens T, code bytes per token cb) of a quantized format."""
    t = tokens_per_page(fmt, block_bytes, num_kv_heads, head_dim, 0)
    return block_bytes // num_kv_heads, t, code_bytes(fmt, head_dim)


def _to_f16(x: Tensor, up: bool) -> Tensor:
    """float32 -> float16 rounded toward +inf (up) or -inf, saturating at float16's range."""
    x = x.clamp(-_F16_MAX, _F16_MAX)
    y = x.half()
    wrong = y.float() < x if up else y.float() > x
    bits = y.view(torch.int16)
    # One ulp further in the wanted direction: positive values grow / negative ones shrink by +-1 on the
    # bits; from zero, the smallest subnormal of the wanted sign (0x8001 is -2^-24 as int16 -32767).
    step = torch.where((y > 0) == up, bits + 1, bits - 1)
    step = torch.where(y == 0, torch.full_like(bits, 1 if up else -32767), step)
    return torch.where(wrong, step, bits).view(torch.float16)


def _scale_zero(lo: Tensor, hi: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    zero = _to_f16(lo, up=False)  # <= lo: no code clips at 0
    scale = _to_f16(((hi - zero.float()) / qmax).clamp_min(_F16_TINY), up=True)  # codes never exceed qmax
    return scale, zero


def _quantize(x: Tensor, scale: Tensor, zero: Tensor, qmax: int) -> Tensor:
    return torch.round((x - zero.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)


def _pack_nibbles(codes: Tensor) -> Tensor:
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.stack((packed & 15, packed >> 4), -1).flatten(-2)


def pack_pages(k: Tensor, v: Tensor, fmt: int, block_bytes: int) -> Tensor:
    """K and V [N, n, Hkv, D] (N pages of n valid tokens each) -> uint8 [N, block_bytes] page rows.

    Native pages are stored in k's dtype (the pool's); quantized ones accept any float dtype."""
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)}: expected equal [N, n, Hkv, D] shapes")
    num_pages, n, num_kv_heads, head_dim = k.shape
    if fmt == FMT_NATIVE:
        block_size = block_bytes // (2 * num_kv_heads * head_dim * k.dtype.itemsize)
        if n > block_size:
            raise ValueError(f"{n} tokens do not fit a native page of {block_size}")
        out = torch.zeros(num_pages, 2, block_size, num_kv_heads, head_dim, dtype=k.dtype, device=k.device)
        out[:, 0, :n] = k
        out[:, 1, :n] = v.to(k.dtype)
        return out.view(num_pages, -1).view(torch.uint8)
    slice_bytes, t, cb = _layout(fmt, block_bytes, num_kv_heads, head_dim)
    if n > t:
        raise ValueError(f"{n} tokens do not fit a format-{fmt} page of {t}")
    qmax = QMAX[fmt]
    # Head-major, as the slices are: [N, Hkv, n, D].
    kf = k.float().transpose(1, 2)
    vf = v.float().transpose(1, 2)
    k_scale, k_zero = _scale_zero(kf.amin(2), kf.amax(2), qmax)  # [N, Hkv, D]: per channel
    v_scale, v_zero = _scale_zero(vf.amin(3), vf.amax(3), qmax)  # [N, Hkv, n]: per token
    k_codes = _quantize(kf, k_scale[:, :, None], k_zero[:, :, None], qmax)
    v_codes = _quantize(vf, v_scale[..., None], v_zero[..., None], qmax)
    if fmt == FMT_INT4:
        k_codes = _pack_nibbles(k_codes)
        # [N, Hkv, t, D] (zero past n) -> [N, Hkv, t / 8, D, 8 tokens] -> 4 bytes each.
        v_codes = torch.nn.functional.pad(v_codes, (0, 0, 0, t - n))
        words = v_codes.view(num_pages, num_kv_heads, t // INT4_V_WORD_TOKENS, INT4_V_WORD_TOKENS, head_dim)
        v_codes = _pack_nibbles(words.transpose(3, 4))

    out = torch.zeros(num_pages, num_kv_heads, slice_bytes, dtype=torch.uint8, device=k.device)
    out[:, :, : n * cb] = k_codes.reshape(num_pages, num_kv_heads, n * cb)
    v_bytes = v_codes.reshape(num_pages, num_kv_heads, -1)
    out[:, :, t * cb : t * cb + v_bytes.shape[-1]] = v_bytes
    halves = torch.zeros(num_pages, num_kv_heads, 2 * head_dim + 2 * t, dtype=torch.float16, device=k.device)
    order = k_channel_order(fmt, head_dim).to(k.device)
    halves[..., :head_dim] = k_scale[..., order]
    halves[..., head_dim : 2 * head_dim] = k_zero[..., order]
    halves[..., 2 * head_dim : 2 * head_dim + n] = v_scale
    halves[..., 2 * head_dim + t : 2 * head_dim + t + n] = v_zero
    out[:, :, 2 * t * cb : 2 * t * cb + halves.shape[-1] * 2] = halves.view(torch.uint8)
    return out.view(num_pages, block_bytes)


def unpack_pages(
    data: Tensor, fmt: int, ntok: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """uint8 [N, block_bytes] page rows -> K, V float32 [N, ntok, Hkv, D] (their first ntok tokens).

    `dtype` is the pool's dtype, which native pages are stored in."""
    num_pages, block_bytes = data.shape
    if fmt == FMT_NATIVE:
        kv = data.view(dtype).view(num_pages, 2, -1, num_kv_heads, head_dim)[:, :, :ntok].float()
        return kv[:, 0], kv[:, 1]
    slice_bytes, t, cb = _layout(fmt, block_bytes, num_kv_heads, head_dim)
    if ntok > t:
        raise ValueError(f"ntok {ntok} > {t} tokens of a format-{fmt} page")
    rows = data.view(num_pages, num_kv_heads, slice_bytes)
    k_codes = rows[..., : ntok * cb].view(num_pages, num_kv_heads, ntok, cb)
    if fmt == FMT_INT4:  # K: even channel in the low nibble; V: [t / 8, D] words of 8 tokens
        k_codes = _unpack_nibbles(k_codes)
        words = t // INT4_V_WORD_TOKENS
        v_codes = rows[..., t * cb : 2 * t * cb].view(num_pages, num_kv_heads, words, head_dim, 4)
        v_codes = _unpack_nibbles(v_codes).transpose(3, 4).reshape(num_pages, num_kv_heads, t, head_dim)
        v_codes = v_codes[:, :, :ntok]
    else:
        v_codes = rows[..., t * cb : (t + ntok) * cb].view(num_pages, num_kv_heads, ntok, cb)
    # A copy: float16 views need an aligned, contiguous byte range.
    halves = rows[..., 2 * t * cb : 2 * t * cb + 4 * (head_dim + t)].contiguous().view(torch.float16).float()
    stored = torch.argsort(k_channel_order(fmt, head_dim)).to(data.device)  # each channel's position
    k_scale, k_zero = halves[..., None, stored], halves[..., None, head_dim + stored]
    v_scale = halves[..., 2 * head_dim : 2 * head_dim + ntok, None]
    v_zero = halves[..., 2 * head_dim + t : 2 * head_dim + t + ntok, None]
    k = k_codes.float() * k_scale + k_zero  # [N, Hkv, ntok, D]
    v = v_codes.float() * v_scale + v_zero
    return k.transpose(1, 2), v.transpose(1, 2)


def _bound(x: Tensor, dim: int, qmax: int) -> Tensor:
    lo = x.float().amin(dim, keepdim=True)
    hi = x.float().amax(dim, keepdim=True)
    mag = torch.maximum(lo.abs(), hi.abs())
    zero_ulp = torch.clamp_min(lo.abs() * 2.0**-10, _F16_TINY)  # the zero point rounded down
    scale = ((hi - lo + zero_ulp) / qmax).clamp_min(_F16_TINY) * (1 + 2.0**-10) + _F16_TINY  # rounded up
    return scale / 2 + mag * 2.0**-20  # plus float32 rounding of (x - zero) / scale and code * scale + zero


def error_bound(k: Tensor, v: Tensor, fmt: int) -> tuple[Tensor, Tensor]:
    """Largest |x - unpack(pack(x))| the format allows for these K, V [N, n, Hkv, D], from their ranges:
    K's bound [N, 1, Hkv, D] (per channel), V's [N, n, Hkv, 1] (per token); broadcastable to K, V."""
    if fmt == FMT_NATIVE:
        return torch.zeros(1, 1, 1, 1, device=k.device), torch.zeros(1, 1, 1, 1, device=v.device)
    return _bound(k, 1, QMAX[fmt]), _bound(v, 3, QMAX[fmt])
