"""A linear layer whose weight can be 16-bit or quantized (int8 per channel, int4 group-wise), and be
switched between them while the engine serves (the weight_bits knob, optd.engine.weight_bits)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optd.kernels.activation import silu_and_mul
from optd.kernels.quant_linear import quant_linear
from optd.kernels.quantize import (
    Int4Weight,
    Int8Weight,
    packed_bytes,
    quantize_int4,
    quantize_int8,
    quantized_bytes,
)

BITS = (4, 8, 16)


class Linear(nn.Module):
    """Like nn.Linear (the loader fills `weight` and `bias`), plus `quantize(bits, w16)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.quant: Int8Weight | Int4Weight | None = None

    @property
    def bits(self) -> int:
        if self.quant is None:
            return 16
        return 8 if isinstance(self.quant, Int8Weight) else 4

    @property
    def nbytes(self) -> int:
        if self.quant is None:
            return self.weight.numel() * self.weight.element_size()
        return packed_bytes(self.quant)

    def nbytes_at(self, bits: int) -> int:
        """What `nbytes` will be once held at `bits` (from the shape: nothing is quantized)."""
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        n, k, dtype = self.out_features, self.in_features, self.weight.dtype
        return n * k * dtype.itemsize if bits == 16 else quantized_bytes(n, k, bits, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        return self._quantized(x, swiglu=False)

    def forward_swiglu(self, gate_up: Tensor) -> Tensor:
        """self(silu(gate) * up) for gate_up = [gate | up]; quantized, the one-row kernels compute the
        product while loading it (one kernel less per MLP at batch 1)."""
        if self.quant is None:
            return F.linear(silu_and_mul(gate_up), self.weight, self.bias)
        return self._quantized(gate_up, swiglu=True)

    def _quantized(self, x: Tensor, swiglu: bool) -> Tensor:
        width = 2 * self.in_features if swiglu else self.in_features
        out = quant_linear(x.reshape(-1, width), self.quant, swiglu).view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias

    def set_bits(self, bits: int, w16: Tensor) -> None:
        """Hold `w16` (the 16-bit master weight, [out, in]) at `bits`; the previous storage is dropped
        (16 bits keeps w16 itself, so pass a tensor the layer may own)."""
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if bits == 16:
            self.weight, self.quant = nn.Parameter(w16, requires_grad=False), None
            return
        self.quant = quantize_int8(w16) if bits == 8 else quantize_int4(w16)
        # An empty 16-bit placeholder keeps the parameter's name, dtype and device for the loader.
        self.weight = nn.Parameter(w16.new_empty(0), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"
