"""The paged KV cache: a pool of fixed-size blocks and the allocator that hands them to sequences.

The pool is raw bytes, one row per (layer, block). A block's format decides how its bytes are
viewed: the native (16-bit) format holds K then V for `block_size` tokens; quantized formats (the
kv_compression knob, see optd.kernels.kv_pages) pack more tokens' lower-bit K/V with their scales and
zero points into the same bytes, so blocks of every format live in one pool and one allocator.

A sequence's block list is its packed (quantized) pages, then a native tail holding the tokens from
`seq.tail_start` on, position-aligned: new tokens are always written there, and full groups of tail
tokens are packed later (optd.engine.kv_compress). Speculative tokens are rolled back by shortening
the tail and returning its now-unused trailing blocks (BlockAllocator.truncate).
"""

from collections import deque
from dataclasses import dataclass

import torch

from optd.engine.sequence import Sequence


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer (K and V)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers."""
        return self.num_layers * self.block_bytes // self.block_size


class KVPool:
    """GPU (or CPU) memory of the cache. Block 0 is scratch: padded batch rows write there (the same id
    in every pool, so one input row can serve the draft's and the target's pools alike)."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        self.scratch_block = 0
        self.data = torch.zeros(layout.num_layers, num_blocks, layout.block_bytes, dtype=torch.uint8,
                                device=device)
        # Per block: format * 256 + tokens for packed pages, 0 for native ones (shared by all layers).
        self.page_meta = torch.zeros(num_blocks, dtype=torch.int32, device=device)
        # Attention reads through the packed kernel once any page may be packed; it is a Python flag
        # because CUDA graphs bake in the kernel chosen at capture.
        self.packed_mode = False
        L = layout
        self._views = [
            self.data[i].view(L.dtype).view(num_blocks, 2, L.block_size, L.num_kv_heads, L.head_dim)
            for i in range(L.num_layers)
        ]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer i, each [num_blocks, block_size, num_kv_heads, head_dim] (strided views)."""
        kv = self._views[i]
        return kv[:, 0], kv[:, 1]

    def native(self) -> torch.Tensor:
        """All layers' blocks in the native format: [layers, blocks, 2, block_size, kv_heads, head_dim]."""
        L = self.layout
        return self.data.view(L.dtype).view(L.num_layers, self.num_blocks, 2, L.block_size,
                                             L.num_kv_heads, L.head_dim)


def blocks_needed(seq: Sequence, num_tokens: int, block_size: int) -> int:
    """Blocks the sequence needs to hold `num_tokens` tokens: its packed pages plus the native tail."""
    return seq.packed_pages + -(-max(num_tokens - seq.tail_start, 0) // block_size)



class BlockAllocator:
    """Free-list of block ids 1..num_blocks (0 is the pool's scratch block); sequences own ordered lists
    of blocks (their block table)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks + 1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks of native pages that `num_tokens` tokens fill."""
        return -(-num_tokens // self.block_size)

    def can_grow(self, blocks: list[int], count: int) -> bool:
        return count - len(blocks) <= len(self._free)

    def grow(self, blocks: list[int], count: int) -> None:
        """Extend `blocks` in place to `count` blocks."""
        need = count - len(blocks)
        if need > len(self._free):
            raise MemoryError(f"KV pool exhausted: need {need} blocks, {len(self._free)} free")
        blocks.extend(self._free.popleft() for _ in range(max(need, 0)))

    def truncate(self, blocks: list[int], count: int) -> None:
        """Shrink `blocks` in place to `count` blocks, freeing the rest."""
        self._free.extend(blocks[count:])
        del blocks[count:]

    def release(self, blocks: list[int]) -> None:
        self.truncate(blocks, 0)
