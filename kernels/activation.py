"""SwiGLU activation of the fused gate/up projection: silu(gate) * up.

`silu_and_mul_ref` is the plain-PyTorch definition of the op (Hugging Face's LlamaMLP, rounding
included) and the CPU path of the engine; `silu_and_mul_triton` is the GPU kernel; `silu_and_mul` picks
one by device. Input [T, 2*I] = [gate | up]; output a new [T, I].
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from optd.kernels.pdl import pdl_options
from optd.kernels.rmsnorm import round_code

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from optd.kernels.pdl import pdl_wait
    from optd.kernels.rmsnorm import round_to
except ImportError:  # the reference path must keep working without triton
    triton = None

# Columns of the output per program: at batch 1 an 8B model's 14336 columns spread over 14 programs.
BLOCK = 1024


def silu_and_mul_ref(x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up  # silu in float32 rounded to the dtype, then the product rounded


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr, out_ptr, sx, so, inter, BLOCK: tl.constexpr, ROUND: tl.constexpr, LIBDEVICE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * sx + inter + cols, mask=mask, other=0.0).to(tl.float32)
        # PyTorch's silu: x / (1 + exp(-x)) with the full-precision expf and an IEEE division. tl.exp
        # is the fast approximate exp2-based one; the interpreter has no libdevice (numpy's exp there).
        e = libdevice.exp(-g) if LIBDEVICE else tl.exp(-g)
        s = round_to(tl.math.div_rn(g, 1.0 + e), ROUND)
        y = round_to(s * u, ROUND)  # exact product of two dtype values, rounded once
        tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: Tensor) -> Tensor:
    assert triton is not None, "silu_and_mul_triton needs triton; use silu_and_mul_ref"
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [T, 2 * intermediate], got {tuple(x.shape)}"
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    if rows > 0 and inter > 0:
        block = min(BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter,
            BLOCK=block, ROUND=round_code(x.dtype), LIBDEVICE=x.device.type != "cpu",
            num_warps=4, enable_fp_fusion=False, **pdl_options(x.device),
        )
    return out


def silu_and_mul(x: Tensor) -> Tensor:
    # ROCm builds of torch report their GPUs as device type "cuda" too.
    if x.device.type == "cuda" and triton is not None:
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
