import pytest
import torch
import torch.nn.functional as F

from optd.kernels.activation import BLOCK, silu_and_mul, silu_and_mul_ref, silu_and_mul_triton
from tests.kernels.test_rmsnorm import DEVICE, DTYPES, assert_close_to_ref, needs_triton


def make(rows, inter, dtype, seed=0, row_pad=0):
    """[gate | up] as the first 2 * inter columns of a wider tensor when row_pad > 0."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2 * inter + row_pad, generator=g) * 3).to(dtype)[:, : 2 * inter]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_torch(dtype):
    x = make(5, 300, dtype)
    gate, up = x[:, :300], x[:, 300:]
    want = F.silu(gate) * up
    assert torch.equal(silu_and_mul_ref(x), want)
    # The textbook formula in float64, to the dtype's precision (silu then product: two roundings).
    exact = gate.double() * torch.sigmoid(gate.double()) * up.double()
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(silu_and_mul_ref(x).double(), exact, rtol=tol, atol=tol)


SHAPES = [(1, 11), (1, 4096), (3, BLOCK + 1), (64, 1408), (2, 14336)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-I{s[1]}")
def test_triton_matches_reference(shape, dtype):
    x = make(*shape, dtype, seed=shape[0] * 31 + shape[1], row_pad=3).to(DEVICE)
    x_before = x.clone()
    got = silu_and_mul_triton(x)
    assert torch.equal(x, x_before), "input must not be modified"
    # silu(gate) within 1 ulp of PyTorch's (exp implementations differ in float32's last bit); the
    # product with an `up` of magnitude up to ~10 can turn that into 2 ulps of the result.
    assert_close_to_ref(got, silu_and_mul_ref(x), max_ulps=2)
    x[:, shape[1] :] = 1.0  # up = 1: the result is the rounded silu itself
    assert_close_to_ref(silu_and_mul_triton(x), silu_and_mul_ref(x), max_ulps=1)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_triton_extremes():
    # Huge |gate|: exp overflows to inf (silu -> -0) or underflows (silu -> gate); zeros stay zero.
    gate = torch.tensor([[-100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 60000.0]])
    x = torch.cat([gate, torch.full_like(gate, 1.5)], dim=1)
    for dtype in DTYPES:
        xd = x.to(dtype).to(DEVICE)
        got, want = silu_and_mul_triton(xd), silu_and_mul_ref(xd)
        assert torch.equal(got.signbit(), want.signbit())
        assert_close_to_ref(got, want, max_ulps=1)


@needs_triton
def test_triton_empty_and_dispatch():
    assert silu_and_mul_triton(make(0, 64, torch.bfloat16)).shape == (0, 64)
    x = make(2, 64, torch.float32)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))  # CPU tensors: the reference
