"""Weight-only quantization formats of the linear layers: int8 per output channel, int4 group-wise.

Calibration-free and round-to-nearest, with torch ops on whatever device the weight is on (the engine
quantizes layer by layer on the GPU from the 16-bit checkpoint tensor), in row chunks so that the float32
temporaries stay a few times 64 MiB whatever the layer size. No host syncs.

- `Int8Weight`: symmetric, one scale per output channel: w ≈ q * scale[:, None], q in -127..127.
- `Int4Weight`: asymmetric, one (scale, zero) per `group` consecutive inputs of a row:
  w ≈ (q - zero) * scale, q in 0..15, eight codes per int32 word. The last group of a row may be
  shorter (ragged K), K may be any size (codes past K are 0 up to the word's end).

The int4 word layout is chosen for the GPU kernels: word j of a row holds k = 8j..8j+7 with k = 8j + 2m
in bits 4m..4m+3 and k = 8j + 2m + 1 in bits 16+4m..19+4m (m = 0..3). So `(word >> 4m) & 0x000F000F`
puts the codes of two consecutive k in the two 16-bit halves of a register: OR'd with a 16-bit float's
exponent bits they are that float plus the code, two operands of a matrix product per two integer ops.

Round-to-nearest error bound (with the scale as stored): |w - dequantized| <= scale / 2 per element,
before the dequantized value is rounded to a 16-bit dtype. Stored scales are rounded *up* to their
dtype so that no code ever clips, and the int4 range always includes 0 (as GPTQ's quantizer does) so
that the zero point needs no clamping: both keep the bound exact.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

INT4_GROUP = 128
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of a layer quantized at once: bounds the float32 temporaries (64 MiB each).
CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class Int8Weight:
    """Symmetric, per output channel: w ≈ q * scale[:, None]."""

    q: Tensor  # int8 [N, K]
    scale: Tensor  # [N], the activations' dtype


@dataclass(frozen=True)
class Int4Weight:
    """Asymmetric, group-wise along K: w ≈ (q - zero) * scale, q in 0..15."""

    q: Tensor  # int32 [N, ceil(K/8)]: eight codes per word, in the order the module docstring gives
    scale: Tensor  # [N, ceil(K/group)]
    zero: Tensor  # [N, ceil(K/group)], scale's dtype; integral unless refined
    k: int  # the unpacked K
    group: int


def packed_bytes(qw: Int8Weight | Int4Weight) -> int:
    """Bytes the quantized weight occupies: codes plus scales (plus zeros)."""
    parts = [qw.q, qw.scale] + ([qw.zero] if isinstance(qw, Int4Weight) else [])
    return sum(t.numel() * t.element_size() for t in parts)


def quantized_bytes(n: int, k: int, bits: int, dtype: torch.dtype, group: int = INT4_GROUP) -> int:
    """Bytes quantize_int8 (bits=8) or quantize_int4 (bits=4) returns for an [n, k] weight of `dtype`
    (what packed_bytes will report), from the shape alone: the engine sizes memory before quantizing."""
    if bits == 8:
        return n * k + n * dtype.itemsize
    if bits == 4:
        return n * -(-k // 8) * 4 + 2 * n * -(-k // group) * dtype.itemsize
    raise ValueError(f"bits: expected 4 or 8, got {bits!r}")


def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"w: expected a 2-D [out_features, in_features] tensor, got {_describe(w)}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"w: dtype {w.dtype} is not one of float32, float16, bfloat16")
    if w.shape[1] == 0:
        raise ValueError("w: in_features (K) is 0")


def _describe(v: object) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


def _check_int(name: str, v: object, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def _round_up_to(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Positive float32 `s` as the nearest `dtype` value >= s (in float32): a stored scale never ends up
    smaller than the one the codes were sized for, so no code clips."""
    if dtype == torch.float32:
        return s
    r = s.to(dtype)
    # Next representable value up: positive finite floats order like their bit patterns.
    r = torch.where(r.float() < s, (r.view(torch.int16) + 1).view(dtype), r)
    return r.float()


def quantize_int8(w: Tensor) -> Int8Weight:
    _check_weight(w)
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=w.dtype, device=w.device)
    for r0, r1 in _row_chunks(n, k):
        wf = w[r0:r1].float()
        amax = wf.abs().amax(1)
        s = _round_up_to(torch.where(amax > 0, amax / 127, 1.0), w.dtype)  # all-zero row: any scale
        q[r0:r1] = torch.round(wf / s[:, None]).clamp_(-127, 127)
        scale[r0:r1] = s
    return Int8Weight(q, scale)


def quantize_int4(w: Tensor, group: int = INT4_GROUP, refine_steps: int = 0) -> Int4Weight:
    """Round-to-nearest over each group's [min(min, 0), max(max, 0)]; `refine_steps` > 0 then alternates
    least-squares (scale, zero) fits and nearest-code updates, keeping a group's new values only where
    they lower its squared reconstruction error (so refinement never makes a group worse)."""
    _check_weight(w)
    _check_int("group", group, 1)
    _check_int("refine_steps", refine_steps, 0)
    n, k = w.shape
    ng = -(-k // group)
    kp = ng * group
    q = torch.empty(n, -(-k // 8), dtype=torch.int32, device=w.device)
    scale = torch.empty(n, ng, dtype=w.dtype, device=w.device)
    zero = torch.empty(n, ng, dtype=w.dtype, device=w.device)
    # 1 where a group position holds a real input (the ragged last group is padded with zeros).
    valid = (torch.arange(kp, device=w.device) < k).float().view(ng, group)
    for r0, r1 in _row_chunks(n, kp):
        wg = F.pad(w[r0:r1].float(), (0, kp - k)).view(r1 - r0, ng, group)
        # Padding zeros change neither min(min, 0) nor max(max, 0).
        lo = wg.amin(-1).clamp_(max=0)
        hi = wg.amax(-1).clamp_(min=0)
        rng = hi - lo
        s = _round_up_to(torch.where(rng > 0, rng / 15, 1.0), w.dtype)  # all-zero group: any scale
        z = torch.round(-lo / s).clamp_(0, 15)  # 0 <= -lo/s <= 15: the clamp only absorbs rounding
        codes = _nearest_codes(wg, s, z)
        if refine_steps:
            codes, s, z = _refine(wg, valid, codes, s, z, refine_steps, w.dtype)
        q[r0:r1] = _pack(codes.view(r1 - r0, kp)[:, :k])
        scale[r0:r1] = s
        zero[r0:r1] = z
    return Int4Weight(q, scale, zero, k, group)


def _nearest_codes(wg: Tensor, s: Tensor, z: Tensor) -> Tensor:
    return torch.round(wg / s[..., None] + z[..., None]).clamp_(0, 15)


def _group_sq_err(wg: Tensor, valid: Tensor, codes: Tensor, s: Tensor, z: Tensor) -> Tensor:
    return (((codes - z[..., None]) * s[..., None] - wg).square() * valid).sum(-1)


def _refine(
    wg: Tensor, valid: Tensor, codes: Tensor, s: Tensor, z: Tensor, steps: int, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    count = valid.sum(-1)
    best = _group_sq_err(wg, valid, codes, s, z)
    for _ in range(steps):
        # (scale, zero) given the codes: the least-squares line w ≈ a * q + b over the group's inputs.
        mq = (codes * valid).sum(-1) / count
        mw = (wg * valid).sum(-1) / count
        dq = (codes - mq[..., None]) * valid
        var = dq.square().sum(-1)
        cov = (dq * wg).sum(-1)
        ok = (var > 0) & (cov > 0)  # a constant or reversed fit keeps the current values
        a = torch.where(ok, cov / torch.where(ok, var, 1.0), s)
        b = torch.where(ok, mw - a * mq, -z * s)
        # As stored (the dtype's rounding), then the nearest codes for exactly those values.
        s_new = a.to(dtype).float()
        z_new = (-b / s_new).to(dtype).float()
        c_new = _nearest_codes(wg, s_new, z_new)
        err = _group_sq_err(wg, valid, c_new, s_new, z_new)
        better = err < best  # NaN from a degenerate fit compares False
        codes = torch.where(better[..., None], c_new, codes)
        s, z = torch.where(better, s_new, s), torch.where(better, z_new, z)
        best = torch.where(better, err, best)
    return codes, s, z


def _pack(codes: Tensor) -> Tensor:
    """[n, k] codes 0..15 (float) -> int32 [n, ceil(k/8)] in the word layout (codes past k are 0)."""
    u = codes.to(torch.uint8)
    u = F.pad(u, (0, -u.shape[1] % 8)).view(u.shape[0], -1, 4, 2)  # [n, words, m, k parity]
    # Byte b of a word (little-endian) holds bits 8b..8b+7: codes (m, parity) = (2b', p) and (2b'+1, p)
    # with b = 2p + b'; low nibble first.
    lo, hi = u[:, :, 0::2], u[:, :, 1::2]  # m = 0, 2 and m = 1, 3: [n, words, 2, 2]
    b = (lo | (hi << 4)).transpose(2, 3)  # [n, words, parity, b']: bytes in memory order
    return b.reshape(u.shape[0], -1).view(torch.int32)


def unpack_int4(qw: Int4Weight) -> Tensor:
    """The codes as uint8 [N, K], in k order."""
    b = qw.q.view(torch.uint8).view(qw.q.shape[0], -1, 2, 2)  # [n, words, parity, b']
    m = torch.stack((b & 0xF, b >> 4), dim=-1)  # [n, words, parity, b', nibble]: m = 2b' + nibble
    return m.flatten(3).transpose(2, 3).reshape(qw.q.shape[0], -1)[:, : qw.k]


def dequantize(qw: Int8Weight | Int4Weight) -> Tensor:
    """[N, K] in scale's dtype, computed in float32 and rounded once."""
    if isinstance(qw, Int8Weight):
        return (qw.q.float() * qw.scale.float()[:, None]).to(qw.scale.dtype)
    if not isinstance(qw, Int4Weight):
        raise ValueError(f"qw: expected an Int8Weight or Int4Weight, got {type(qw).__name__}")
    g = torch.arange(qw.k, device=qw.q.device) // qw.group
    codes = unpack_int4(qw).float()
    return ((codes - qw.zero.float()[:, g]) * qw.scale.float()[:, g]).to(qw.scale.dtype)
