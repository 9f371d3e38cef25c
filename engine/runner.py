"""Turns a scheduled step into model inputs and runs it; decode replays CUDA graphs on GPUs.

A decode step at small batch is a few hundred tiny kernels; launching them one by one from Python
would cost more than reading the weights. So at start-up one graph is captured per batch-size
bucket, with static input buffers; a step copies its inputs in, pads to the bucket and replays.
Padded rows write their K/V into the pool's scratch block and attend to nothing.
"""

import torch
from torch import Tensor

from optd.engine.kv_cache import KVPool
from optd.engine.kv_compress import PrefillPacker
from optd.engine.model import ForwardBatch, LlamaModel
from optd.engine.sequence import Sequence


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


Chunk = tuple[int, list[int]]  # (position of the first token, tokens) fed for one sequence


class ModelRunner:
    """Runs one model over its KV pool. `widths` are the rows per sequence whose steps replay CUDA
    graphs: 1 for plain decode, k + 1 for verifying k draft tokens. A draft model's runner reads a
    sequence's `draft_blocks`, by position; the target's reads its packed pages and native tail."""

    def __init__(self, model: LlamaModel, pool: KVPool, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool, widths: tuple[int, ...] = (1,), draft: bool = False):
        self.model, self.pool, self.draft = model, pool, draft
        self.device = model.embed.weight.device
        self.block_size = pool.layout.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.buckets = batch_buckets(max_num_seqs)
        self.widths = widths
        self.use_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.recapture()

    def drop_graphs(self) -> None:
        """Run eagerly from now on (the graphs would replay on weights that are being replaced)."""
        self.graphs.clear()

    def recapture(self, now: bool = True) -> None:
        """Capture the graphs (again, after the weights changed): all at once, or with now=False one per
        capture_next() call, so that the engine serves a step between two captures."""
        self.graphs.clear()
        self._pending: list[tuple[int, int]] = []
        if not self.use_graphs:
            return
        rows, dev = max(self.buckets) * max(self.widths), self.device
        self._meta = torch.zeros(5, rows, dtype=torch.long, device=dev)
        self._tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=dev)
        self._logits = torch.empty(rows, self.model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self._meta[2] = self.pool.scratch_block * self.block_size
        # Inputs reach the graph's buffers from pinned memory: a copy from pageable memory may wait for
        # the stream, i.e. for the step still running, which would stall the next step's launch. Two
        # buffers, each reused once the copies out of it have run.
        self._staging = [(torch.empty(5, rows, dtype=torch.long, pin_memory=True),
                          torch.empty(rows, self.max_blocks, dtype=torch.int32, pin_memory=True),
                          torch.cuda.Event()) for _ in range(2)]
        self._graph_pool = None
        self._pending = [(b, w) for w in sorted(self.widths, reverse=True)
                         for b in sorted(self.buckets, reverse=True)]
        while now and self.capture_next():
            pass

    @property
    def capturing(self) -> bool:
        """Graphs remain to capture (one per capture_next() call)."""
        return bool(self._pending)

    def capture_next(self) -> bool:
        """Capture one pending graph (a step without it runs eagerly); True while more remain."""
        if not self._pending:
            return False
        b, width = self._pending.pop(0)
        with torch.inference_mode():
            meta, tables = self._meta[:, : b * width], self._tables[: b * width]
            self._forward(meta, tables)  # warm-up: Triton compiles outside the capture
            torch.cuda.current_stream().synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local, and stream (not device) syncs: another engine in the process capturing or
            # running at the same time must not invalidate this capture, nor this one fail its calls.
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                self._logits[: b * width] = self._forward(meta, tables)
            self._graph_pool = graph.pool()
            self.graphs[b, width] = graph
        torch.cuda.current_stream().synchronize()
        return bool(self._pending)

    def kv(self, seq: Sequence) -> tuple[list[int], int, int]:
        """The sequence's block table in this runner's pool, its packed pages and tail start."""
        if self.draft:
            return seq.draft_blocks, 0, 0
        return seq.blocks, seq.packed_pages, seq.tail_start

    def _slots(self, seq: Sequence, packed_tokens: int, pages: int) -> Tensor:
        """Prefill: where each token's 16-bit K/V goes. The first `packed_tokens` go into `pages` packed
        pages instead (the PrefillPacker writes them), so their native writes land in the scratch block."""
        blocks, packed, tail_start = self.kv(seq)
        assert packed == tail_start == 0, "prefill starts from an empty cache"
        i = torch.arange(seq.num_tokens) - packed_tokens
        table = torch.tensor([*blocks[pages:], self.pool.scratch_block])  # the tail, then scratch
        slots = table[(i.clamp_min(0) // self.block_size).clamp_max(len(table) - 1)] * self.block_size
        return torch.where(i < 0, self.pool.scratch_block * self.block_size, slots + i % self.block_size)

    def _to_device(self, *tensors: Tensor) -> list[Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], packer: PrefillPacker | None = None) -> Tensor:
        """Whole sequences from position 0 (new prompts, or preempted ones being recomputed). With a
        packer (kv_compression), the prompts' leading tokens go straight into packed pages."""
        lens = [s.num_tokens for s in seqs]
        ids = torch.tensor([t for s in seqs for t in s.token_ids])
        positions = torch.cat([torch.arange(n) for n in lens])
        plans = packer.plans if packer else [([], 0)] * len(seqs)
        slots = torch.cat([self._slots(s, take, len(specs))
                           for s, (specs, take) in zip(seqs, plans, strict=True)])
        last_rows = torch.tensor(lens).cumsum(0) - 1
        ids, positions, slots, last_rows = self._to_device(ids, positions, slots, last_rows)
        batch = ForwardBatch(positions, slots, prefill_lens=lens, logits_rows=last_rows, packer=packer)
        logits = self.model(ids, batch, self.pool)
        if packer:
            packer.commit()
        return logits

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], next_tokens: Tensor | None = None) -> Tensor:
        """One new token per sequence: the last sampled one, whose K/V is not cached yet. With
        next_tokens (on the device), each sequence's token from the step still in flight instead: not
        in its token_ids yet, it goes at the position after them."""
        if next_tokens is None:
            chunks = [(s.num_tokens - 1, s.token_ids[-1:]) for s in seqs]
        else:
            chunks = [(s.num_tokens, [0]) for s in seqs]  # token ids filled in on the device
        return torch.cat(self.extend(seqs, chunks, width=1, tokens=next_tokens))

    @torch.inference_mode()
    def extend(self, seqs: list[Sequence], chunks: list[Chunk], width: int | None = None,
               tokens: Tensor | None = None) -> list[Tensor]:
        """Feed each sequence its chunk on top of its cache (each row attends to its own prefix);
        returns the logits of every fed row, per sequence. With `width` (>= every chunk), rows are
        padded to it and a captured graph replays when there is one. `tokens` (one-token chunks, on
        the device) replace the chunks' token ids."""
        n = len(seqs)
        bucket = next((b for b in self.buckets if b >= n), None)
        graph = self.graphs.get((bucket, width)) if width else None
        if graph is None:  # eager: exactly the rows fed
            widths = [len(toks) for _, toks in chunks]
            meta, tables = self.row_inputs(seqs, chunks, widths, len(seqs))
            meta = meta.to(self.device)
            if tokens is not None:
                meta[0, :n] = tokens
            logits = self._forward(meta, tables.to(self.device))
            return list(logits.split(widths))
        meta, tables = self.row_inputs(seqs, chunks, [width] * n, bucket)
        rows = meta.shape[1]
        host_meta, host_tables, copied = self._staging[0]
        self._staging.reverse()
        copied.synchronize()
        host_meta[:, :rows].copy_(meta)
        host_tables[:rows].copy_(tables)
        self._meta[:, :rows].copy_(host_meta[:, :rows], non_blocking=True)
        self._tables[:rows].copy_(host_tables[:rows], non_blocking=True)
        copied.record()
        if tokens is not None:
            assert width == 1, "device-side tokens feed one-token chunks"
            self._meta[0, :n].copy_(tokens)
        graph.replay()
        logits = self._logits[:rows].view(bucket, width, -1)
        return [logits[i, : len(toks)] for i, (_, toks) in enumerate(chunks)]

    def row_inputs(self, seqs: list[Sequence], chunks: list[Chunk], widths: list[int],
                    bucket: int) -> tuple[Tensor, Tensor]:
        """Host tensors, one row per fed token, sequence i owning widths[i] rows; padding rows (and
        padding sequences up to `bucket`) write to the scratch block and attend to nothing.
        meta [5, rows] = token id, position, cache slot, tokens visible in the native tail, packed pages
        (see ForwardBatch); tables [rows, max_blocks]."""
        bs, scratch = self.block_size, self.pool.scratch_block * self.block_size
        rows = sum(widths) + (bucket - len(seqs)) * (widths[0] if widths else 1)
        meta = [[0] * rows, [0] * rows, [scratch] * rows, [0] * rows, [0] * rows]
        tables, empty, r = [], [0] * self.max_blocks, 0
        for s, (start, toks), w in zip(seqs, chunks, widths, strict=True):
            blocks, packed, tail_start = self.kv(s)
            table = blocks + [0] * (self.max_blocks - len(blocks))
            for j, token in enumerate(toks):
                pos = start + j
                meta[0][r + j], meta[1][r + j], meta[3][r + j] = token, pos, pos + 1 - tail_start
                meta[2][r + j] = blocks[packed + (pos - tail_start) // bs] * bs + (pos - tail_start) % bs
                meta[4][r + j] = packed
            tables += [table] * w
            r += w
        tables += [empty] * (rows - r)
        return torch.tensor(meta), torch.tensor(tables, dtype=torch.int32)

    def _forward(self, meta: Tensor, tables: Tensor) -> Tensor:
        batch = ForwardBatch(meta[1], meta[2], block_tables=tables, context_lens=meta[3].int(),
                             packed_pages=meta[4].int())
        return self.model(meta[0], batch, self.pool)
