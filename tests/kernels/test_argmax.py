import pytest
import torch

from optd.kernels.argmax import BLOCK, argmax_rows, argmax_rows_ref, argmax_rows_triton
from tests.kernels.test_rmsnorm import DEVICE, needs_triton

# Widths below, at and past one block, and the 8B model's vocabulary.
WIDTHS = [1, 37, BLOCK, BLOCK + 1, 3 * BLOCK - 5, 128256]


@needs_triton
@pytest.mark.parametrize("width", WIDTHS)
def test_matches_torch_on_random_rows(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, width, generator=g).to(DEVICE)
    assert torch.equal(argmax_rows_triton(x), argmax_rows_ref(x))


@needs_triton
def test_ties_go_to_the_lowest_index_in_any_block():
    x = torch.zeros(4, 3 * BLOCK + 7)
    x[0, [5, 17]] = 2.0  # same lane block, two lanes
    x[1, [BLOCK + 3, 3]] = 2.0  # the same lane in two blocks
    x[2, [2 * BLOCK + 9, BLOCK + 100]] = 2.0
    x[3, 3 * BLOCK + 6] = 1.0  # in the partial last block
    want = torch.tensor([5, 3, BLOCK + 100, 3 * BLOCK + 6])
    assert torch.equal(argmax_rows_triton(x.to(DEVICE)).cpu(), want)
    assert torch.equal(x.argmax(-1), want)


@needs_triton
def test_constant_rows_and_minus_inf_give_index_zero():
    x = torch.full((2, BLOCK + 9), float("-inf"))
    x[1] = 7.0
    assert argmax_rows_triton(x.to(DEVICE)).tolist() == [0, 0]


@needs_triton
def test_strided_rows_and_half_precision():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 1000, generator=g).to(torch.bfloat16)
    x = wide[:, :900].to(DEVICE)  # row stride 1000
    assert torch.equal(argmax_rows_triton(x), argmax_rows_ref(x))


@needs_triton
def test_no_rows():
    assert argmax_rows_triton(torch.zeros(0, 10, device=DEVICE)).shape == (0,)


def test_bad_shapes_are_rejected_with_the_shape():
    for bad in (torch.zeros(5), torch.zeros(2, 0)):
        with pytest.raises(ValueError, match=r"\[rows, width\]"):
            argmax_rows(bad)


def test_cpu_path_takes_the_reference():
    x = torch.randn(4, 77)
    assert torch.equal(argmax_rows(x), argmax_rows_ref(x))
