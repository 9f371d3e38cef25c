"""The paged KV cache: a pool of fixed-size blocks and the allocator that hands them to sequences.

The pool is raw bytes, one row per (layer, block). A block's format decides how its bytes are
viewed: today the 16-bit format holds K then V for `block_size` tokens; quantized formats (the
kv_compression knob) will pack lower-bit K/V with their scales and zero points into the same bytes,
so blocks of either format live in one pool and one allocator. Speculative tokens are rolled back
by shortening a sequence and returning its now-unused trailing blocks (BlockAllocator.truncate).
"""

from collections import deque
from dataclasses import dataclass

import torch


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
    """GPU (or CPU) memory of the cache. The last block is scratch: padded batch rows write there."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks - 1
        self.data = torch.zeros(layout.num_layers, num_blocks, layout.block_bytes, dtype=torch.uint8,
                                device=device)
        L = layout
        self._views = [
            self.data[i].view(L.dtype).view(num_blocks, 2, L.block_size, L.num_kv_heads, L.head_dim)
            for i in range(L.num_layers)
        ]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer i, each [num_blocks, block_size, num_kv_heads, head_dim] (strided views)."""
        kv = self._views[i]
        return kv[:, 0], kv[:, 1]


class BlockAllocator:
    """Free-list of block ids; sequences own ordered lists of blocks (their block table)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, blocks: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(blocks) <= len(self._free)

    def grow(self, blocks: list[int], num_tokens: int) -> None:
        """Extend `blocks` in place so they hold `num_tokens` tokens."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need > len(self._free):
            raise MemoryError(f"KV pool exhausted: need {need} blocks, {len(self._free)} free")
        blocks.extend(self._free.popleft() for _ in range(max(need, 0)))

    def truncate(self, blocks: list[int], num_tokens: int) -> None:
        """Shrink `blocks` in place to what `num_tokens` tokens need, freeing the rest."""
        keep = self.blocks_for(num_tokens)
        self._free.extend(blocks[keep:])
        del blocks[keep:]

    def release(self, blocks: list[int]) -> None:
        self.truncate(blocks, 0)
