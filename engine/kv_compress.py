"""The kv_compression knob: which pages a requested ratio calls for, and packing sequences' native
tails into them between engine steps.

A ratio r (fraction of KV bytes per token saved against the native cache) is reached with the least
damaging mix: int8 pages first (KIVI: keys per channel, values per token), then a per-page mix of int8
and int4 pages, and only beyond int4 alone token eviction: each int4 page then keeps the highest-scored
of `group` tail tokens (SnapKV scores for prompt tokens, a key-norm score for generated ones; the first
SINKS tokens of a sequence are always kept). New tokens are written to the native tail and packed once
a page's worth of them is committed, so the recent window stays exact.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from optd.engine.kv_cache import KVPool
from optd.engine.scheduler import Scheduler
from optd.engine.sequence import Sequence
from optd.kernels.kv_pages import FMT_INT4, FMT_INT8, FMT_NATIVE, pack_pages, tokens_per_page, unpack_pages

SINKS = 4  # attention sinks (StreamingLLM): evicting the first tokens costs far more than their bytes


@dataclass(frozen=True)
class PageSpec:
    fmt: int
    group: int  # tail tokens that go into the page (more than it holds: the rest is evicted)
    keep: int   # tokens it holds


class KVCompressor:
    def __init__(self, pool: KVPool, scheduler: Scheduler):
        self.pool, self.scheduler = pool, scheduler
        L = pool.layout
        self.block_size = L.block_size
        self.per_page = {f: tokens_per_page(f, L.block_bytes, L.num_kv_heads, L.head_dim, L.block_size)
                         for f in (FMT_INT8, FMT_INT4)}
        self.ratio = 0.0
        self.packs_total = 0
        self.pack_seconds_total = 0.0

    @property
    def max_quantized_ratio(self) -> float:
        """The ratio int4 pages reach alone; beyond it tokens are evicted."""
        return 1 - self.block_size / self.per_page[FMT_INT4]

    def nominal_ratio(self, r: float) -> float:
        """The ratio full pages reach for a requested r (int8 alone saves more than small r ask)."""
        return 0.0 if r == 0 else max(r, 1 - self.block_size / self.per_page[FMT_INT8])

    def next_page(self, r: float, pages: int, tokens: int) -> PageSpec:
        """The page to pack next for a sequence whose packed pages (`pages`) cover `tokens` tokens."""
        bs, t8, t4 = self.block_size, self.per_page[FMT_INT8], self.per_page[FMT_INT4]
        if r > self.max_quantized_ratio:
            return PageSpec(FMT_INT4, max(round(bs / (1 - r)), t4), t4)
        # int8 while the sequence stays within the budget of (1 - r) native pages per block_size tokens.
        if (pages + 1) * bs <= (1 - r) * (tokens + t8) + 1e-9 or r <= 1 - bs / t8:
            return PageSpec(FMT_INT8, t8, t8)
        return PageSpec(FMT_INT4, t4, t4)

    # ---- packing (engine thread, between steps) ----

    def plan(self, seq: Sequence, committed: int) -> tuple[list[PageSpec], int]:
        """The pages `committed` tail tokens fill for this sequence, and how many tokens they take."""
        specs, take = [], 0
        pages, tokens = seq.packed_pages, seq.tail_start
        while self.ratio > 0:
            spec = self.next_page(self.ratio, pages, tokens)
            if take + spec.group > committed:
                break
            specs.append(spec)
            take, pages, tokens = take + spec.group, pages + 1, tokens + spec.group
        # Token order is irrelevant to attention: pages of one format together pack in one call and
        # stream through the kernel without a branch per page.
        return sorted(specs, key=lambda s: s.fmt), take

    def prefill_blocks(self, seq: Sequence) -> int:
        """Blocks a (re)admitted sequence's prefill fills: its packed pages plus the native tail."""
        specs, take = self.plan(seq, seq.num_tokens)
        return len(specs) + -(-(seq.num_tokens - take) // self.block_size)

    def pack(self, seq: Sequence) -> None:
        """Pack the committed tokens of the sequence's native tail into as many pages as they fill."""
        committed = seq.num_cached - seq.tail_start
        specs, take = self.plan(seq, committed)
        if specs:
            tail = self._tail(seq, committed)
            positions = torch.arange(seq.tail_start, seq.tail_start + take, device=tail.device)
            self._write(seq, tail, specs, positions)

    def repack(self, seq: Sequence) -> bool:
        """Re-pack everything the sequence holds for a raised ratio (fewer bytes, blocks freed). False
        when it already saves as much: lowering the ratio only changes what new tokens get."""
        logical = seq.num_cached
        if logical == 0 or self.seq_ratio(seq) >= self.ratio - 0.02:
            return False
        stream = self._stored(seq)  # [layers, 2, stored, kv_heads, D]
        stored = stream.shape[2]
        # Earlier eviction left fewer stored than logical tokens: aim the stored ones at what the
        # whole sequence must reach.
        r_eff = 1 - (1 - self.ratio) * logical / stored
        specs, take, pages = [], 0, 0
        while r_eff > 0:
            spec = self.next_page(r_eff, pages, take)
            if take + spec.group > stored:
                break
            specs.append(spec)
            take, pages = take + spec.group, pages + 1
        rest = stored - take
        if len(specs) + -(-rest // self.block_size) >= len(seq.blocks):
            return False  # would not free a block
        positions = torch.full((take,), SINKS, device=stream.device)  # not sinks unless first
        positions[: min(SINKS, take)] = torch.arange(min(SINKS, take))
        seq.packed_pages, seq.tail_start = 0, 0
        self._write(seq, stream, specs, positions, logical=logical)
        return True

    def seq_ratio(self, seq: Sequence) -> float:
        """What the sequence saves now against native pages for its tokens."""
        native = -(-seq.num_cached // self.block_size)
        return 1 - len(seq.blocks) / native if native else 0.0

    def _tail(self, seq: Sequence, n: int) -> Tensor:
        """The first n tokens of the native tail: [layers, 2, n, kv_heads, D] (a copy)."""
        blocks = seq.blocks[seq.packed_pages : seq.packed_pages + -(-n // self.block_size)]
        idx = torch.tensor(blocks, device=self.pool.device)
        tail = self.pool.read_native(idx)  # [L, nb, 2, bs, H, D]
        L, nb, _, bs, H, D = tail.shape
        return tail.permute(0, 2, 1, 3, 4, 5).reshape(L, 2, nb * bs, H, D)[:, :, :n]

    def _stored(self, seq: Sequence) -> Tensor:
        """Every token the sequence holds, packed pages first, dequantized: [layers, 2, n, kv_heads, D]."""
        L = self.pool.layout
        blocks = seq.blocks[: seq.packed_pages]
        meta = self.pool.page_meta[blocks].tolist() if blocks else []
        parts, i = [], 0
        while i < len(blocks):  # one unpack per run of pages with the same format and count
            j = i
            while j < len(blocks) and meta[j] == meta[i]:
                j += 1
            ids = torch.tensor(blocks[i:j], device=self.pool.device)
            k, v = unpack_pages(self.pool.read(ids).flatten(0, 1), meta[i] >> 8, meta[i] & 255,
                                L.num_kv_heads, L.head_dim, L.dtype)  # [L * pages, ntok, H, D]
            kv = torch.stack([k, v], 1).view(L.num_layers, j - i, 2, *k.shape[1:])
            parts.append(kv.transpose(1, 2).flatten(2, 3).to(L.dtype))  # [L, 2, pages * ntok, H, D]
            i = j
        parts.append(self._tail(seq, seq.num_cached - seq.tail_start))
        return torch.cat(parts, 2)

    def _write(self, seq: Sequence, stream: Tensor, specs: list[PageSpec], positions: Tensor,
               logical: int | None = None) -> None:
        """Pack stream[:, :, :sum(groups)] into pages per `specs`, the rest back into the native tail,
        reusing the sequence's blocks after its first `seq.packed_pages`; frees what is left over.
        `positions`: the sequence positions of the packed tokens (sinks key on them)."""
        bs, pool = self.block_size, self.pool
        n = stream.shape[2]
        blocks = seq.blocks[seq.packed_pages :]
        new_pages = blocks[: len(specs)]
        start = self.pack_runs(stream, specs, positions, None, new_pages, slice(None))
        # What did not fill a page goes back to the start of the native tail.
        rest = stream[:, :, start:n]
        r = rest.shape[2]
        tail_ids = blocks[len(new_pages) : len(new_pages) + -(-r // bs)]
        if r:
            L, _, _, H, D = rest.shape
            padded = rest.new_zeros(L, 2, len(tail_ids) * bs, H, D)
            padded[:, :, :r] = rest
            pool.write_native(torch.tensor(tail_ids, device=pool.device),
                              padded.view(L, 2, len(tail_ids), bs, H, D).permute(0, 2, 1, 3, 4, 5))
        self.set_meta(new_pages, specs)
        logical = seq.num_cached if logical is None else logical
        seq.packed_pages += len(new_pages)
        seq.tail_start = logical - r
        self.scheduler.truncate(seq, seq.num_cached)
        self.packs_total += 1

    def pack_runs(self, stream: Tensor, specs: list[PageSpec], positions: Tensor, scores: Tensor | None,
                  ids: list[int], layers: slice | int) -> int:
        """Quantize stream [L', 2, n, H, D] (the pool layers `layers`) into pages `ids` per `specs`;
        returns how many tokens of the stream that took."""
        pool, start, done = self.pool, 0, 0
        for fmt, run in _runs(specs):
            group, keep, m = run[0].group, run[0].keep, len(run)
            chunk = stream[:, :, start : start + m * group]
            L, _, _, H, D = chunk.shape
            chunk = chunk.reshape(L, 2, m, group, H, D)
            if keep < group:
                chunk = self._evict(chunk, positions[start : start + m * group].view(m, group), scores, keep)
            k, v = (chunk[:, i].reshape(L * m, keep, H, D) for i in (0, 1))
            packed = pack_pages(k, v, fmt, pool.layout.block_bytes).view(L, m, -1)
            idx = torch.tensor(ids[done : done + m], device=pool.device)
            pool.write(layers, idx, packed[0] if isinstance(layers, int) else packed)
            start, done = start + m * group, done + m
        return start

    def set_meta(self, ids: list[int], specs: list[PageSpec]) -> None:
        if ids:
            meta = [s.fmt * 256 + s.keep for s in specs]
            self.pool.page_meta[torch.tensor(ids, device=self.pool.device)] = torch.tensor(
                meta, dtype=torch.int32, device=self.pool.device)

    def _evict(self, chunk: Tensor, positions: Tensor, scores: Tensor | None, keep: int) -> Tensor:
        """Keep the `keep` highest-scored tokens of each group, per layer and kv head.
        chunk [L, 2, m, group, H, D]; positions [m, group]; scores [L, H, n] of positions 0..n-1."""
        L, _, m, group, H, D = chunk.shape
        if scores is not None and int(positions.max()) < scores.shape[-1]:
            score = scores[:, :, positions.flatten()].view(L, H, m, group).permute(0, 2, 3, 1)
        else:  # keys with a small norm draw the most attention in practice (KNorm)
            score = -chunk[:, 0].float().norm(dim=-1)  # [L, m, group, H]
        score = score.masked_fill((positions < SINKS)[None, :, :, None], float("inf"))
        idx = score.topk(keep, dim=2).indices.sort(dim=2).values  # [L, m, keep, H]
        idx = idx[:, None, :, :, :, None].expand(L, 2, m, keep, H, D)
        return chunk.gather(3, idx)


class PrefillPacker:
    """Writes prompts straight into packed pages: each layer's prefill hands over its K/V (and, when
    tokens are evicted, their SnapKV scores), which go into the sequence's first blocks; only the rest
    is written to the native tail (ModelRunner.prefill sends the packed tokens' 16-bit writes to the
    scratch block). So a prompt never holds more blocks than its packed form."""

    def __init__(self, compressor: KVCompressor, seqs: list[Sequence]):
        self.compressor, self.seqs = compressor, seqs
        self.plans = [compressor.plan(s, s.num_tokens) for s in seqs]

    def take(self, i: int) -> int:
        """Tokens of sequence i that go into packed pages."""
        return self.plans[i][1]

    def write(self, layer: int, i: int, k: Tensor, v: Tensor, scores: Callable[[], Tensor]) -> None:
        """k, v [len, kv_heads, D] of sequence i in `layer`; scores() -> [kv_heads, len]."""
        specs, take = self.plans[i]
        if not specs:
            return
        stream = torch.stack([k[:take], v[:take]])[None]
        evicts = any(s.keep < s.group for s in specs)
        positions = torch.arange(take, device=k.device)
        ids = self.seqs[i].blocks[: len(specs)]
        self.compressor.pack_runs(stream, specs, positions, scores()[None] if evicts else None, ids, layer)

    def commit(self) -> None:
        """After the forward: the sequences' packed pages and tails are what the prefill wrote."""
        for seq, (specs, take) in zip(self.seqs, self.plans, strict=True):
            self.compressor.set_meta(seq.blocks[: len(specs)], specs)
            seq.packed_pages, seq.tail_start = len(specs), take


def _runs(specs: list[PageSpec]) -> list[tuple[int, list[PageSpec]]]:
    """Consecutive equal specs, so each run is one pack_pages call."""
    runs: list[tuple[int, list[PageSpec]]] = []
    for s in specs:
        if runs and runs[-1][1][0] == s:
            runs[-1][1].append(s)
        else:
            runs.append((s.fmt, [s]))
    return runs


__all__ = ["FMT_NATIVE", "KVCompressor", "PageSpec"]
