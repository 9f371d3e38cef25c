import os
import subprocess
import sys

import pytest
import torch

from optd.kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_triton

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: Triton kernel not tested")

# Triton kernels run on CUDA tensors when a GPU is there and the interpreter is off
# (TRITON_INTERPRET=0 python -m pytest ...); otherwise on CPU tensors through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5

# Put before every compile script (run_compile_script): the targets, and one kernel compiled for one.
COMPILE_HELPER = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# An H100 and an MI300X; programmatic dependent launch (optd.kernels.pdl) on NVIDIA only, as at run time.
GPU_TARGETS = ((GPUTarget("cuda", 90, 32), True), (GPUTarget("hip", "gfx942", 64), False))

def compile_for(target, fn, types, constexprs, options, divisible=()):
    # Arguments not in constexprs are typed from types (i32 otherwise); pointers and the `divisible`
    # arguments are divisible by 16, as the launcher specializes them (vector loads).
    sig = {name: types.get(name, "i32") for name in fn.arg_names if name not in constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in sig and (sig[name].startswith("*") or name in divisible)}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    triton.compile(src, target=target, options=options)
"""


def run_compile_script(script: str) -> None:
    """Run COMPILE_HELPER + `script` (kernels compiled for GPU targets, no GPU needed) in a subprocess:
    under TRITON_INTERPRET=1, @triton.jit gives interpreted functions, which the compiler cannot take.
    Skips the test where this Triton build lacks the NVIDIA or AMD backend."""
    from triton.backends import backends

    if not {"nvidia", "amd"} <= set(backends):
        pytest.skip("this Triton build lacks the NVIDIA or AMD backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_HELPER + script], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-shaped fp16/bf16 tensors (0 for +0 vs -0)."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)

    def ordered(t):  # sign-magnitude bits -> integers that order like the floats
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i + 32768), i)

    return (ordered(a) - ordered(b)).abs()


def assert_close_to_ref(got: torch.Tensor, want: torch.Tensor, max_ulps: int = 1):
    """fp32: tight tolerance. fp16/bf16: every element within `max_ulps` and at most 0.1% of them (or 2)
    off at all; a kernel that skips one of PyTorch's intermediate roundings is off in far more."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.numel() == 0:
        return
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    d = ulps(got, want)
    assert int(d.max()) <= max_ulps, f"max {int(d.max())} ulps"
    off = int((d > 0).sum())
    assert off <= max(2, got.numel() // 1000), f"{off} of {got.numel()} elements differ"


def make(rows, hidden, dtype, seed=0, row_pad=0):
    """x as the first `hidden` columns of a wider tensor when row_pad > 0 (row stride != hidden)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden + row_pad, generator=g) * 3).to(dtype)[:, :hidden]
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
    return x, res, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 320), (7, 4096), (3, 77)])
def test_reference_matches_transformers(shape, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, _, w = make(*shape, dtype)
    hf = LlamaRMSNorm(shape[1], eps=EPS).to(dtype)
    hf.weight.data.copy_(w)
    with torch.no_grad():
        want = hf(x)
    assert torch.equal(rms_norm_ref(x, w, EPS), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_residual(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, res, w = make(5, 320, dtype)
    summed = (x.float() + res.float()).to(dtype)  # one rounding of the exact float32 sum
    out, r = rms_norm_ref(x, w, EPS, residual=res)
    assert r is res and torch.equal(res, summed), "residual must be updated in place to x + residual"
    hf = LlamaRMSNorm(320, eps=EPS).to(dtype)
    hf.weight.data.copy_(w)
    with torch.no_grad():
        assert torch.equal(out, hf(summed))


SHAPES = [(1, 320), (1, 4096), (5, 1000), (64, 4096), (3, 33)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-H{s[1]}")
def test_triton_matches_reference(shape, dtype):
    x, _, w = make(*shape, dtype, seed=shape[0] * 7 + shape[1], row_pad=3)
    x, w = x.to(DEVICE), w.to(DEVICE)
    # The float32 sum of squares may differ in its last bit (reduction order), which can move the
    # normalized value by 1 ulp of the dtype; the product with a weight up to 2 can make that 2 ulps.
    assert_close_to_ref(rms_norm_triton(x, w, EPS), rms_norm_ref(x, w, EPS), max_ulps=2)
    ones = torch.ones_like(w)
    assert_close_to_ref(rms_norm_triton(x, ones, EPS), rms_norm_ref(x, ones, EPS), max_ulps=1)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 320), (9, 4096), (64, 4096)], ids=lambda s: f"T{s[0]}-H{s[1]}")
def test_triton_residual(shape, dtype):
    x, res, w = make(*shape, dtype, seed=1, row_pad=5)
    x, res, w = x.to(DEVICE), res.to(DEVICE), w.to(DEVICE)
    x_before = x.clone()
    summed = (x.float() + res.float()).to(dtype)
    res_ref = res.clone()
    want, _ = rms_norm_ref(x, w, EPS, residual=res_ref)
    out, r = rms_norm_triton(x, w, EPS, residual=res)
    assert r is res, "the Triton path returns the residual it updated in place"
    assert torch.equal(res, summed), "residual must hold x + residual, rounded once to the dtype"
    assert torch.equal(x, x_before), "x must not be modified"
    assert_close_to_ref(out, want, max_ulps=2)


@needs_triton
def test_triton_empty_and_dispatch():
    x, _, w = make(0, 320, torch.float16)
    assert rms_norm_triton(x, w, EPS).shape == (0, 320)
    x, res, w = make(2, 64, torch.float32)
    # CPU tensors take the reference path bit for bit.
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))
    res2 = res.clone()
    out, r = rms_norm(x, w, EPS, residual=res)
    assert r is res and torch.equal(out, rms_norm_ref(x, w, EPS, residual=res2)[0]) and torch.equal(r, res2)
