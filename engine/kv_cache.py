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
from collections.abc import Callable
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


Ids = list[int] | torch.Tensor  # block ids


class KVPool:
    """GPU (or CPU) memory of the cache: one [num_blocks, block_bytes] byte tensor per layer, so that it
    can be resized a layer at a time (the weight_bits knob lends it the bytes fewer bits free) without
    ever holding two copies of the whole pool. Block 0 is scratch: padded batch rows write there (the
    same id in every pool, so one input row can serve the draft's and the target's pools alike)."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self.scratch_block = 0
        self._data = [torch.zeros(num_blocks, layout.block_bytes, dtype=torch.uint8, device=self.device)
                      for _ in range(layout.num_layers)]
        # Per block: format * 256 + tokens for packed pages, 0 for native ones (shared by all layers).
        self.page_meta = torch.zeros(num_blocks, dtype=torch.int32, device=self.device)
        # Attention reads through the packed kernel once any page may be packed; it is a Python flag
        # because CUDA graphs bake in the kernel chosen at capture.
        self.packed_mode = False
        self._build_views()

    def _build_views(self) -> None:
        L = self.layout
        self._views = [d.view(L.dtype).view(self.num_blocks, 2, L.block_size, L.num_kv_heads, L.head_dim)
                       for d in self._data]

    def layer_data(self, i: int) -> torch.Tensor:
        """Layer i's blocks as raw bytes, [num_blocks, block_bytes] (what the packed-page kernel reads)."""
        return self._data[i]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer i, each [num_blocks, block_size, num_kv_heads, head_dim] (strided views)."""
        kv = self._views[i]
        return kv[:, 0], kv[:, 1]

    # ---- gather / scatter of whole blocks (packing, compaction; engine thread, between steps) ----

    def _index(self, ids: Ids) -> torch.Tensor:
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)  # an empty list too

    def read(self, ids: Ids) -> torch.Tensor:
        """A copy of blocks `ids` in every layer: [layers, n, block_bytes]."""
        ids = self._index(ids)
        return torch.stack([d.index_select(0, ids) for d in self._data])

    def write(self, layers: int | slice, ids: Ids, values: torch.Tensor) -> None:
        """Store blocks `ids`: values [n, block_bytes] for one layer, [layers, n, block_bytes] for a slice."""
        ids = self._index(ids)
        if isinstance(layers, int):
            self._data[layers].index_copy_(0, ids, values)
            return
        for data, v in zip(self._data[layers], values, strict=True):
            data.index_copy_(0, ids, v)

    def read_native(self, ids: Ids) -> torch.Tensor:
        """Blocks `ids` viewed in the native format: [layers, n, 2, block_size, kv_heads, head_dim]."""
        L = self.layout
        return self.read(ids).view(L.dtype).view(L.num_layers, len(ids), 2, L.block_size, L.num_kv_heads,
                                                 L.head_dim)

    def write_native(self, ids: Ids, values: torch.Tensor) -> None:
        """Store native blocks: values [layers, n, 2, block_size, kv_heads, head_dim], the layout's dtype."""
        L = self.layout
        raw = values.contiguous().view(torch.uint8).view(L.num_layers, len(ids), L.block_bytes)
        self.write(slice(None), ids, raw)

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy blocks src[i] to dst[i] in every layer, page formats included (compaction)."""
        if not src:
            return
        s, d = self._index(src), self._index(dst)
        for data in self._data:
            data.index_copy_(0, d, data.index_select(0, s))
        self.page_meta.index_copy_(0, d, self.page_meta.index_select(0, s))

    def resize(self, num_blocks: int) -> None:
        """Reallocate to `num_blocks` blocks a layer at a time, keeping blocks 0..min(old, new) - 1 (new
        ones are zero: native, empty). If an allocation fails, the layers already resized are put back
        (the blocks past the smaller size are unused either way) and the error is raised."""
        old = self.num_blocks
        if num_blocks == old:
            return
        self._views = []  # they would keep the old tensors alive
        done = 0
        try:
            for i in range(len(self._data)):
                self._data[i] = _resized(self._data[i], num_blocks)
                self._release()
                done += 1
            self.page_meta = _resized(self.page_meta, num_blocks)
        except Exception:
            for i in range(done):
                self._data[i] = _resized(self._data[i], old)
                self._release()
            raise
        else:
            self.num_blocks = num_blocks
        finally:
            self._build_views()

    def _release(self) -> None:
        """On a GPU, hand a replaced layer's memory back to the device at once: left in the caching
        allocator, the next layers would be carved out of it, and the fragments left over could not serve
        the weights that take the memory next."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _resized(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A zeroed copy of `t` with `rows` rows, the first min(rows, len(t)) copied over."""
    out = t.new_zeros(rows, *t.shape[1:])
    keep = min(rows, t.shape[0])
    out[:keep] = t[:keep]
    return out


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

    def compact(self, tables: list[list[int]], num_blocks: int,
                copy: Callable[[list[int], list[int]], None]) -> None:
        """Before shrinking to `num_blocks`: move the blocks above it that `tables` hold to free ids at
        or below it. `copy(src, dst)` copies their contents first (the pool's move), so a failure there
        changes nothing; then the tables are updated in place."""
        if self.num_used > num_blocks:
            raise ValueError(f"cannot compact {self.num_used} blocks in use into {num_blocks}")
        high = [b for table in tables for b in table if b > num_blocks]
        if not high:
            return
        low = [b for b in self._free if b <= num_blocks][: len(high)]
        copy(high, low)
        moved = dict(zip(high, low, strict=True))
        for table in tables:
            table[:] = [moved.get(b, b) for b in table]
        taken = set(low)
        self._free = deque([*(b for b in self._free if b not in taken), *high])

    def resize(self, num_blocks: int) -> None:
        """Hand out ids 1..num_blocks from now on; shrinking needs every id above it free (compact)."""
        if num_blocks >= self.num_blocks:
            self._free.extend(range(self.num_blocks + 1, num_blocks + 1))
        else:
            free = set(self._free)
            held = [b for b in range(num_blocks + 1, self.num_blocks + 1) if b not in free]
            if held:
                raise ValueError(f"cannot shrink the KV allocator to {num_blocks} blocks: blocks {held[:8]}"
                                 f"{'...' if len(held) > 8 else ''} above it are in use (compact first)")
            self._free = deque(b for b in self._free if b <= num_blocks)
        self.num_blocks = num_blocks
