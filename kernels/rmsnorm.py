"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

`rms_norm_ref` is the plain-PyTorch definition of the op (Hugging Face's LlamaRMSNorm, rounding
included) and the CPU path of the engine; `rms_norm_triton` is the GPU kernel; `rms_norm` picks one by
device. With `residual`, both paths first update `residual` IN PLACE to `x + residual` (rounded to the
dtype, as PyTorch's add does), normalize that sum, and return `(normed, residual)`.
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

# Widest row one program normalizes; the whole row sits in registers (4096 for an 8B model).
MAX_HIDDEN = 65536
# Codes for `round_to`: which dtype a float32 intermediate is rounded to, as PyTorch rounds it.
ROUND_NONE, ROUND_FP16, ROUND_BF16 = 0, 1, 2


def round_code(dtype: torch.dtype) -> int:
    return {torch.float32: ROUND_NONE, torch.float16: ROUND_FP16, torch.bfloat16: ROUND_BF16}[dtype]


def rms_norm_ref(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    if residual is not None:
        x = residual.add_(x)  # x + residual, rounded to the dtype, in place
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)  # cast before the weight, as Hugging Face does
    return out if residual is None else (out, residual)


if triton is not None:

    @triton.jit
    def round_to(x, ROUND: tl.constexpr):
        """float32 x rounded to nearest-even in the target dtype, kept as float32.

        bf16 is rounded with integer ops: the CPU interpreter (TRITON_INTERPRET=1) truncates a float32
        -> bfloat16 cast instead of rounding it. Values are then exact in the target dtype, so the final
        store's cast is exact on every backend.
        """
        if ROUND == 2:
            u = x.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))  # NaN stays NaN
        elif ROUND == 1:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, sx, sr, so, hidden, eps,
        BLOCK: tl.constexpr, HAS_RES: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr = False,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        # The weight is no other kernel's output: its load may start before the wait, and must be issued
        # before the reduction's barriers, which would hold it back by a memory latency.
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
            x = round_to(x + r, ROUND)
            tl.store(res_ptr + row * sr + cols, x.to(res_ptr.dtype.element_ty), mask=mask)
        var = tl.sum(x * x, axis=0) / hidden
        normed = round_to(x * tl.rsqrt(var + eps), ROUND)
        y = round_to(w * normed, ROUND)
        tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    assert triton is not None, "rms_norm_triton needs triton; use rms_norm_ref"
    hidden = x.shape[-1]
    assert 0 < hidden <= MAX_HIDDEN, f"hidden size {hidden} outside 1..{MAX_HIDDEN}"
    assert weight.shape == (hidden,) and weight.stride(0) == 1, "weight must be a contiguous [hidden]"
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"
    x2 = x.reshape(-1, hidden)  # a view for [T, H] rows; any stride between rows is fine
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    r2 = x2  # unused placeholder when there is no residual
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        r2 = residual.view(-1, hidden)  # must be a view: the sum is written back into it
        assert r2.stride(1) == 1, "residual's last dim must be contiguous"
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    rows = x2.shape[0]
    if rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out2, x2.stride(0), r2.stride(0), out2.stride(0), hidden, eps,
            BLOCK=block, HAS_RES=residual is not None, ROUND=round_code(x.dtype),
            num_warps=min(max(block // 256, 1), 16), **pdl_options(x.device),
        )
    return out if residual is None else (out, residual)


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    # ROCm builds of torch report their GPUs as device type "cuda" too.
    if x.device.type == "cuda" and triton is not None:
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
