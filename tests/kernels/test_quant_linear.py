from dataclasses import replace

import pytest
import torch

from optd.kernels.quant_linear import (
    INT4_GROUP,
    Int4Weight,
    Int8Weight,
    KernelConfig,
    dequantize,
    packed_bytes,
    quant_linear,
    quant_linear_ref,
    quant_linear_triton,
    quantize_int4,
    quantize_int8,
)
from tests.kernels.test_rmsnorm import DEVICE, needs_triton, run_compile_script

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One ulp of headroom for a scale stored in the dtype (it is rounded up, never down).
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def weight(n, k, dtype, seed):
    """Random weights with some structure the quantizers must handle: an all-zero row, an outlier, a
    row of one sign, a row offset away from zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[1] = 0.0
    if n > 2:
        w[2, k // 2] = 3.0  # an outlier sets its row's (or group's) scale
    if n > 3:
        w[3] = w[3].abs() + 0.01  # all positive: the int4 range must still hold 0 and the max
    if n > 4:
        w[4] = w[4] - 1.0  # all negative, far from zero
    return w.to(dtype)


def code_at(words: list[int], k: int) -> int:
    """Code k of a row from the documented word layout: word k // 8; k = 8j + 2m + parity sits at bit
    4m + 16 parity."""
    r = k % 8
    return ((words[k // 8] & 0xFFFFFFFF) >> (4 * (r // 2) + 16 * (r % 2))) & 0xF


def naive_dequant_int4(qw: Int4Weight) -> torch.Tensor:
    """Element by element from the documented layout, independent of the module's unpacking."""
    n = qw.q.shape[0]
    out = torch.empty(n, qw.k)
    q, s, z = qw.q.tolist(), qw.scale.float().tolist(), qw.zero.float().tolist()
    for i in range(n):
        for k in range(qw.k):
            out[i, k] = (code_at(q[i], k) - z[i][k // qw.group]) * s[i][k // qw.group]
    return out


# --- quantization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (33, 300), (3, 1)])
def test_int8_error_within_bound(shape, dtype):
    n, k = shape
    w = weight(n, k, dtype, seed=n * k)
    qw = quantize_int8(w)
    assert isinstance(qw, Int8Weight)
    assert qw.q.dtype == torch.int8 and qw.q.shape == (n, k)
    assert qw.scale.dtype == dtype and qw.scale.shape == (n,)
    assert int(qw.q.min()) >= -127 and int(qw.q.max()) <= 127
    s = qw.scale.float()
    recon = qw.q.float() * s[:, None]
    err = (recon - w.float()).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all()), f"err/scale {float((err / s[:, None]).max())}"
    # The scale is the row's absmax / 127, up to rounding it up to the dtype: not loosened to pass.
    amax = w.float().abs().amax(1)
    nz = amax > 0
    assert bool((s[nz] >= amax[nz] / 127).all()) and bool((s[nz] <= amax[nz] / 127 * (1 + ULP[dtype])).all())
    assert bool((qw.q[~nz] == 0).all()), "all-zero rows must quantize to 0"
    assert torch.equal(dequantize(qw), recon.to(dtype))
    assert bool((dequantize(qw)[1] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(6, 300, 128), (5, 77, 32), (5, 100, 25), (3, 1, INT4_GROUP), (7, 256, 64)],
    ids=lambda s: f"N{s[0]}-K{s[1]}-g{s[2]}",
)
def test_int4_error_within_bound(shape, dtype):
    n, k, group = shape
    w = weight(n, k, dtype, seed=n + k + group)
    if k > group:
        w[0, :group] = 0.0  # an all-zero group
        w[0, group : 2 * group] = 0.25  # a constant group
    qw = quantize_int4(w, group=group)
    ng = -(-k // group)
    assert isinstance(qw, Int4Weight) and qw.k == k and qw.group == group
    assert qw.q.dtype == torch.int32 and qw.q.shape == (n, -(-k // 8))
    assert qw.scale.shape == qw.zero.shape == (n, ng) and qw.scale.dtype == qw.zero.dtype == dtype
    z = qw.zero.float()
    assert torch.equal(z, z.round()) and float(z.min()) >= 0 and float(z.max()) <= 15, "RTN zeros are codes"
    rows = qw.q.tolist()
    assert all(code_at(r, kk) == 0 for r in rows for kk in range(k, 8 * qw.q.shape[1])), "codes past K are 0"

    recon = naive_dequant_int4(qw)
    gidx = torch.arange(k) // group
    s = qw.scale.float()[:, gidx]
    err = (recon - w.float()).abs()
    assert bool((err <= s / 2 * (1 + 1e-5)).all()), f"max err / scale {float((err / s).max())}"
    # The scale is the group's range (0 included) / 15, up to rounding it up to the dtype.
    wp = torch.nn.functional.pad(w.float(), (0, ng * group - k)).view(n, ng, group)
    rng = wp.amax(-1).clamp(min=0) - wp.amin(-1).clamp(max=0)
    nz = rng > 0
    sg = qw.scale.float()
    assert bool((sg[nz] >= rng[nz] / 15).all()) and bool((sg[nz] <= rng[nz] / 15 * (1 + ULP[dtype])).all())
    assert bool((recon[1] == 0).all()), "an all-zero row dequantizes to exact zeros"
    if k > group:
        assert bool((recon[0, :group] == 0).all()), "an all-zero group dequantizes to exact zeros"
    # dequantize: the same values in float32, rounded once to the dtype.
    assert torch.equal(dequantize(qw), recon.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [512, 300])
def test_int4_refinement_lowers_error(k, dtype):
    w = (torch.randn(64, k, generator=torch.Generator().manual_seed(k)) * 0.02).to(dtype)
    rtn, refined = quantize_int4(w), quantize_int4(w, refine_steps=10)
    assert refined.q.shape == rtn.q.shape and refined.scale.shape == rtn.scale.shape

    def group_sse(qw):  # float32 reconstruction from the stored values, per (row, group)
        e = (dequant_f32(qw) - w.float()).square()
        e = torch.nn.functional.pad(e, (0, -k % INT4_GROUP))
        return e.view(64, -1, INT4_GROUP).sum(-1)

    before, after = group_sse(rtn), group_sse(refined)
    ratio = float(after.sum() / before.sum())
    assert ratio < 0.93, f"refined / round-to-nearest squared error: {ratio:.3f}"
    assert bool((after <= before * (1 + 1e-5) + 1e-12).all()), "refinement made a group worse"
    assert not torch.equal(refined.zero, refined.zero.round()), "refined zero points are fractional"


def dequant_f32(qw: Int4Weight) -> torch.Tensor:
    """naive_dequant_int4 vectorized (same layout, shifts instead of a loop): for larger weights."""
    r = torch.arange(8)
    shifts = 4 * (r // 2) + 16 * (r % 2)
    codes = ((qw.q.long()[:, :, None] >> shifts) & 0xF).view(qw.q.shape[0], -1)[:, : qw.k].float()
    g = torch.arange(qw.k) // qw.group
    return (codes - qw.zero.float()[:, g]) * qw.scale.float()[:, g]


def test_packed_bytes():
    w = torch.randn(448, 320).to(torch.bfloat16)  # the demo model's fused qkv
    assert packed_bytes(quantize_int8(w)) == 448 * 320 + 448 * 2 == 144256
    q4 = quantize_int4(w)
    assert packed_bytes(q4) == 448 * 160 + 2 * 448 * 3 * 2 == 77056
    for qw in (quantize_int8(w), q4, quantize_int4(w[:, :77].float(), group=32)):
        tensors = [qw.q, qw.scale] + ([qw.zero] if isinstance(qw, Int4Weight) else [])
        assert packed_bytes(qw) == sum(t.untyped_storage().nbytes() for t in tensors)


def test_bad_inputs_are_rejected():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="w:"):
        quantize_int8(torch.randn(64))
    with pytest.raises(ValueError, match="w:"):
        quantize_int4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="group"):
        quantize_int4(w, group=0)
    with pytest.raises(ValueError, match="refine_steps"):
        quantize_int4(w, refine_steps=-1)
    qw = quantize_int4(w)
    with pytest.raises(ValueError, match="x:"):
        quant_linear_ref(torch.randn(2, 63), qw)
    with pytest.raises(ValueError, match="x:"):
        quant_linear(torch.randn(2, 64, dtype=torch.bfloat16), qw)
    with pytest.raises(ValueError, match="qw:"):
        quant_linear_ref(torch.randn(2, 64), w)


# --- the op -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_matmul_with_dequantized_weight(dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 300, generator=g).to(dtype)
    x = torch.randn(2, 3, 300, generator=g).to(dtype)
    for qw in (quantize_int8(w), quantize_int4(w)):
        got = quant_linear_ref(x, qw)
        assert got.shape == (2, 3, 40) and got.dtype == dtype
        assert torch.equal(got, x @ dequantize(qw).T)
        assert torch.equal(quant_linear(x, qw), got), "CPU tensors take the reference path"
    # And close to the exact product (float64) with the weight as quantized.
    qw = quantize_int4(w)
    assert_within_rounding(quant_linear_ref(x, qw), x.double() @ naive_dequant_int4(qw).double().T, x, qw)


def assert_matches_ref(got: torch.Tensor, x: torch.Tensor, qw) -> None:
    want = quant_linear_ref(x, qw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_within_rounding(got, want, x, qw)


def assert_within_rounding(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, qw) -> None:
    """Elementwise, relative to the sum of |x| |w| behind each output: float32 allows reordered sums;
    bf16 a few roundings of the output and of each weight (the kernels keep weights unrounded). A wrong
    code, group or nibble is off by the size of the output itself."""
    wf = dequantize(qw).float()
    mag = x.float().abs() @ wf.abs().T  # sum |x| |w|: the scale of rounding errors
    if x.dtype == torch.float32:
        bound = 1e-5 * mag + 1e-6
    else:
        bound = 2.0**-7 * want.float().abs() + 2.0**-8 * mag + 1e-3
    err = (got.float() - want.float()).abs()
    worst = float((err / bound).max())
    assert worst <= 1, f"max err {float(err.max()):.3g}: {worst:.2f}x the bound"


# (rows M, out N, in K, group, config or None for the default): covers the GEMV (block_m 1) with
# whole-group and in-group tiles and split K, the int4 weight-left kernel (left; int8 runs those cases
# on the x-left tiles) and the x-left decode tiles (block_m 16) with split K (the last program adds the
# partial sums), the prefill path (block_m > 16), ragged last groups, K not a multiple of 8 (a partial
# last word), group sizes that are not powers of two (a word's codes in two groups) and ragged last
# column tiles.
CASES = [
    (1, 40, 300, 128, None),
    (1, 40, 600, 128, KernelConfig(1, 16, 256, split_k=2)),
    (1, 24, 77, 32, KernelConfig(1, 16, 64, split_k=2)),
    (1, 24, 100, 16, KernelConfig(1, 8, 32)),
    (1, 24, 100, 48, KernelConfig(16, 16, 32)),
    (1, 24, 77, 25, KernelConfig(16, 16, 32, split_k=3)),
    (1, 40, 600, 128, KernelConfig(16, 16, 128, split_k=2, left=True, sxdot=True)),
    (7, 24, 77, 32, KernelConfig(16, 16, 32, split_k=2, left=True)),
    (16, 40, 300, 64, KernelConfig(16, 32, 64, left=True, sxdot=True)),
    (5, 40, 300, 128, None),
    (16, 24, 400, 64, KernelConfig(16, 16, 64, split_k=3)),
    (3, 24, 77, 25, KernelConfig(16, 16, 64)),
    (40, 40, 300, 128, KernelConfig(32, 32, 64, swizzle=2)),
    (24, 24, 77, 32, KernelConfig(32, 16, 32)),
    (20, 24, 100, 25, KernelConfig(32, 16, 64)),
    (70, 136, 264, 128, None),
]


def case_id(c) -> str:
    m, n, k, group, config = c
    return f"M{m}-N{n}-K{k}-g{group}" + ("" if config else "-default")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case, fmt, dtype):
    m, n, k, group, config = case
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    w[n // 2] = 0.0
    # x as a column slice of a wider tensor: its row stride is not K.
    x = torch.randn(m, k + 3, generator=g).to(dtype)[:, :k]
    # One refinement step: fractional zero points, as the kernels must handle.
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, group=group, refine_steps=1)
    if config is not None and config.left and fmt == "int8":
        config = replace(config, left=False)  # the weight-left kernel is int4 only
    got = quant_linear_triton(x.to(DEVICE), moved(qw, DEVICE), config)
    assert_matches_ref(got.cpu(), x, qw)


def moved(qw, device):
    return type(qw)(**{f: v.to(device) if isinstance(v, torch.Tensor) else v for f, v in vars(qw).items()})


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m, k, config", [(1, 300, None), (1, 77, KernelConfig(1, 16, 64, split_k=2)),
                                          (3, 300, None)], ids=["gemv", "gemv-ragged-split", "rows3"])
def test_swiglu_input_matches_silu_and_mul_then_the_linear(m, k, config, fmt, dtype):
    """swiglu=True takes x = [gate | up] and multiplies silu(gate) * up: fused into the one-row GEMVs'
    loads, through silu_and_mul beforehand elsewhere. A wrong half, a missing activation or an unrounded
    product is off by far more than the bound."""
    g = torch.Generator().manual_seed(m * 100 + k)
    w = (torch.randn(40, k, generator=g) * 0.05).to(dtype)
    x = (torch.randn(m, 2 * k, generator=g) * 2).to(dtype)
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, group=32 if k == 77 else 128)
    got = quant_linear_triton(x.to(DEVICE), moved(qw, DEVICE), config, swiglu=True).cpu()
    want = quant_linear_ref(x, qw, swiglu=True)
    assert got.shape == want.shape == (m, 40)
    from optd.kernels.activation import silu_and_mul_ref

    assert_within_rounding(got, want, silu_and_mul_ref(x), qw)
    with pytest.raises(ValueError, match=f"expected \\[..., {2 * k}\\]"):
        quant_linear_triton(x[:, :k].to(DEVICE), moved(qw, DEVICE), swiglu=True)


@needs_triton
def test_configs_a_kernel_cannot_take_are_rejected():
    x = torch.randn(1, 77).to(torch.bfloat16).to(DEVICE)
    w = torch.randn(40, 77).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="GEMV takes int4 groups"):
        quant_linear_triton(x, moved(quantize_int4(w, group=48), DEVICE), KernelConfig(1, 16, 64))
    with pytest.raises(AssertionError, match="left kernel"):
        quant_linear_triton(x, moved(quantize_int8(w), DEVICE), KernelConfig(16, 64, 64, left=True))
    with pytest.raises(AssertionError, match="left kernel"):
        quant_linear_triton(x, moved(quantize_int4(w, group=48), DEVICE), KernelConfig(16, 64, 32, left=True))


@needs_triton
@pytest.mark.parametrize("group", [128, 48])
def test_triton_float16(group):
    """fp16 activations take other 16-bit codes (1024 + q instead of 128 + q) on the decode path."""
    g = torch.Generator().manual_seed(16)
    w = (torch.randn(40, 300, generator=g) * 0.05).to(torch.float16)
    qw = quantize_int4(w, group=group, refine_steps=1)
    for m, config in ((1, KernelConfig(16, 16, 32, split_k=2)), (3, None), (20, KernelConfig(32, 16, 32)),
                      (2, KernelConfig(16, 16, 32, split_k=2, left=True, sxdot=True)), (1, None)):
        if config is not None and config.left and group != 128:
            continue  # the weight-left kernel takes power-of-two groups
        x = torch.randn(m, 300, generator=g).to(torch.float16)
        assert_matches_ref(quant_linear_triton(x.to(DEVICE), moved(qw, DEVICE), config).cpu(), x, qw)


@needs_triton
def test_split_k_is_deterministic_and_leaves_counters_at_zero():
    """The last program of a column tile adds the partial sums in split order: the same bits every
    call, whichever program finishes last, and the arrival counters are back at zero for the next
    launch (a CUDA graph replays the same counters)."""
    from optd.kernels.quant_linear import _split_counters

    g = torch.Generator().manual_seed(9)
    w = (torch.randn(40, 1024, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(2, 1024, generator=g).to(torch.bfloat16).to(DEVICE)
    qw = moved(quantize_int4(w), DEVICE)
    configs = (KernelConfig(16, 16, 128, split_k=4), KernelConfig(16, 16, 128, split_k=4, left=True),
               KernelConfig(1, 16, 128, split_k=4))
    for config in configs:
        if config.block_m == 1:
            x = x[:1]
        first = quant_linear_triton(x, qw, config)
        assert not bool(_split_counters(first.device).any()), "counters left non-zero"
        for _ in range(2):
            assert torch.equal(quant_linear_triton(x, qw, config), first)
        assert_matches_ref(first.cpu(), x.cpu(), quantize_int4(w))


@needs_triton
def test_triton_random_shapes():
    """Shapes drawn at random (seeded) through the default configs of both formats."""
    g = torch.Generator().manual_seed(8)
    for _ in range(4):
        m = int(torch.randint(1, 24, (), generator=g))
        n = int(torch.randint(1, 50, (), generator=g))
        k = int(torch.randint(1, 400, (), generator=g))
        w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        for qw in (quantize_int8(w), quantize_int4(w)):
            assert_matches_ref(quant_linear_triton(x.to(DEVICE), moved(qw, DEVICE)).cpu(), x, qw)


@needs_triton
def test_triton_empty_and_leading_dims():
    qw = quantize_int4(torch.randn(24, 64))
    assert quant_linear_triton(torch.randn(0, 64, device=DEVICE), moved(qw, DEVICE)).shape == (0, 24)
    x = torch.randn(2, 3, 64)
    got = quant_linear_triton(x.to(DEVICE), moved(qw, DEVICE)).cpu()
    assert got.shape == (2, 3, 24)
    assert_matches_ref(got.view(6, 24), x.view(6, 64), qw)


# --- compilation for real GPUs -------------------------------------------------------------------

# Compiles the kernels for an H100 (sm_90) and an MI300 (gfx942) with the Triton compiler, no GPU
# needed: the interpreter accepts code that the compiler rejects (tl.dot shapes, layouts, dtypes), and
# the gfx942 build shows the kernels use no CUDA-only intrinsics (test_rmsnorm's run_compile_script).
COMPILE_SCRIPT = r"""
import optd.kernels.quant_linear as QL

# Row strides the launcher specializes as divisible by 16, as it does pointers.
STRIDES = ("sqn", "ssn", "szn", "sxm", "som", "sop")

def ptrs(q, x="*bf16"):
    return {"x_ptr": x, "q_ptr": q, "s_ptr": x, "z_ptr": x, "out_ptr": x, "ws_ptr": "*fp32",
            "cnt_ptr": "*i32"}

common = dict(GROUP=128, OFFSET=128.0, HALF=False, UPCAST=False, SPLIT=True, BLOCK_M=16, BLOCK_N=64,
              BLOCK_K=128)
fp16 = dict(HALF=True, OFFSET=1024.0)
gemm = dict(common, FAST=True, SWIZZLE=1, BLOCK_N=32)
gemv4 = dict(GROUP=128, EVEN_K=True, EXACT=False, SPLIT=True, BLOCK_N=64, BLOCK_K=512, STAGES=3, SWIGLU=False)
gemv8 = dict(SPLIT=True, BLOCK_N=16, BLOCK_K=256, STAGES=3, SWIGLU=True)
cases = [
    (QL._decode_int4_kernel, ptrs("*i32"), {**common, "SXDOT": True, "STAGES": 3}, 4),
    (QL._decode_int4_kernel, ptrs("*i32", "*fp16"), {**common, **fp16, "SXDOT": False, "STAGES": 1}, 4),
    (QL._decode_int4_kernel, ptrs("*i32", "*fp32"),
     {**common, "SXDOT": False, "SPLIT": False, "BLOCK_K": 32, "STAGES": 3}, 4),
    (QL._gemm_kernel, ptrs("*i8"), {**gemm, "INT4": False}, 4),
    (QL._gemm_kernel, ptrs("*i32", "*fp16"), {**gemm, **fp16, "INT4": True}, 4),
    (QL._gemm_kernel, ptrs("*i32"), {**gemm, "INT4": True, "GROUP": 48, "FAST": False, "BLOCK_K": 64}, 4),
    (QL._gemm_kernel, ptrs("*i8"), {**gemm, "INT4": False, "SPLIT": False, "BLOCK_M": 128, "BLOCK_N": 128,
                                    "BLOCK_K": 64, "SWIZZLE": 8}, 8),
    (QL._gemm_kernel, ptrs("*i32"), {**gemm, "INT4": True, "SPLIT": False, "BLOCK_M": 128, "BLOCK_N": 128,
                                     "BLOCK_K": 64, "SWIZZLE": 8}, 8),
    (QL._gemv_int4_kernel, ptrs("*i32"), gemv4, 4),
    (QL._gemv_int4_kernel, ptrs("*i32"),
     {**gemv4, "GROUP": 32, "SPLIT": False, "EVEN_K": False, "SWIGLU": True}, 4),
    (QL._gemv_int8_kernel, ptrs("*i8"), gemv8, 4),
]
for target, nvidia in GPU_TARGETS:
    for fn, types, constexprs, warps in cases:
        try:
            options = {"num_warps": warps, "num_stages": 3}
            compile_for(target, fn, types, {**constexprs, "PDL": nvidia}, options, STRIDES)
        except Exception as e:
            sys.exit(f"{target.arch} {fn.__name__} {constexprs}: {type(e).__name__}: {e}")
print("compiled", len(cases), "kernels for sm_90 and gfx942")
"""


@needs_triton
def test_kernels_compile_for_gpus():
    run_compile_script(COMPILE_SCRIPT)
