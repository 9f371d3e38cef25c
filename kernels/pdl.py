"""Programmatic dependent launch (NVIDIA Hopper and later): a kernel launched with it is put on the GPU
as the kernel before it in the stream ends, instead of after that kernel's completion is processed, and
waits for it (`pdl_wait`, its first statement) before touching memory. That hides part of the gap
between the ~300 small kernels of a decode step (bench/RESULTS.md: 8B shape on an H100, graph replay
6052 -> 5856 us a token at 16 bits, 2790 -> 2731 us at 4 bits). Elsewhere (ROCm, older GPUs, the CPU
interpreter) kernels launch as usual and `pdl_wait` compiles to nothing.

No kernel lets its dependents start early (gdc_launch_dependents): on the H100 that made a 4-bit step
slower, whether first (2.8 -> 3.3 ms) or right after the wait (2.76 -> 3.39 ms), likely because a GEMV's
programs, placed while the previous kernel still holds most SMs, then share SMs unevenly.
"""

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference paths must keep working without triton
    triton = None
try:
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # a Triton without grid dependency control
    gdc_wait = None


@functools.cache
def _capable(index: int) -> bool:
    hopper_or_later = torch.cuda.get_device_capability(index)[0] >= 9
    return gdc_wait is not None and torch.version.hip is None and hopper_or_later


def pdl_options(device: torch.device) -> dict:
    """Launch keywords for a kernel whose first statement is `pdl_wait(PDL)`."""
    if device.type != "cuda" or not _capable(device.index if device.index is not None else
                                             torch.cuda.current_device()):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel has finished and its writes are visible: nothing before this
        may write memory, or read memory that a kernel writes (model weights, fixed while a step runs,
        may be read before it)."""
        if PDL:
            gdc_wait()
