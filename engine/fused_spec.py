"""Greedy speculation as one forward program: the draft catches up, proposes k tokens (each step fed by
the last one's argmax) and the target scores them all, with one upload and one read back per step.

A speculative step is k + 1 small forwards. Launched one by one from Python, with inputs built and
copied per forward, the host work cost more than the GPU work (at batch 1 on an H100 the demo target's
forward takes 0.17 ms and the draft's 0.05 ms, while the host spent ~0.5 ms per step). So on CUDA the
whole step is one graph per (batch bucket, k), captured at start-up; on CPU the same program runs
eagerly, which is how the tests check it.

Rows of the input `meta` [5, 2B(k+1)] (token, position, cache slot, tokens visible in the native tail,
packed pages: as ModelRunner.row_inputs), in three sections:
- catch-up, 2 per sequence: the tokens whose draft K/V is missing (1 or 2; a single one sits in the
  second row, so the draft's first proposal is always read from the second row);
- draft steps 1..k-1, B rows each: position only, the token comes from the previous step's argmax;
- verification, k + 1 per sequence: the last token, then the k drafts filled in on the device.
A row that feeds nothing (past a sequence's own k, or padding up to the bucket) writes its K/V to the
scratch block and attends to nothing.
"""

import numpy as np
import torch
from torch import Tensor

from optd.engine.model import ForwardBatch
from optd.engine.runner import ModelRunner
from optd.engine.sequence import Sequence


class FusedGreedySpec:
    def __init__(self, target: ModelRunner, draft: ModelRunner, max_k: int, use_graphs: bool):
        assert target.block_size == draft.block_size and target.max_blocks == draft.max_blocks
        assert draft.draft and not target.draft
        self.target, self.draft, self.max_k = target, draft, max_k
        self.block_size, self.max_blocks = target.block_size, target.max_blocks
        self.scratch_slot = target.pool.scratch_block * target.block_size  # block 0 in both pools
        self.buckets = target.buckets
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.use_graphs = use_graphs and target.device.type == "cuda"
        self.recapture()

    def drop_graphs(self) -> None:
        self.graphs.clear()

    def recapture(self, now: bool = True) -> None:
        """As ModelRunner.recapture: all graphs now, or one per capture_next() call."""
        self.graphs.clear()
        self._pending: list[tuple[int, int]] = []
        if not self.use_graphs:
            return
        b, k, dev = max(self.buckets), self.max_k, self.target.device
        self._meta = torch.zeros(5, 2 * b * (k + 1), dtype=torch.long, device=dev)
        self._meta[2] = self.scratch_slot
        self._tables = torch.zeros(2 * b, self.max_blocks, dtype=torch.int32, device=dev)
        self._out = torch.zeros(b, 2 * k + 1, dtype=torch.long, device=dev)
        self._host_meta = torch.zeros(self._meta.shape, dtype=torch.long).pin_memory()
        self._host_tables = torch.zeros(self._tables.shape, dtype=torch.int32).pin_memory()
        self._graph_pool = None
        self._pending = [(b, k) for k in range(self.max_k, 0, -1) for b in sorted(self.buckets, reverse=True)]
        while now and self.capture_next():
            pass

    def capture_next(self) -> bool:
        """Capture one pending graph (a step without it runs eagerly); True while more remain."""
        if not self._pending:
            return False
        b, k = self._pending.pop(0)
        with torch.inference_mode():
            meta, tables = self._meta[:, : 2 * b * (k + 1)], self._tables[: 2 * b]
            self._program(meta, tables, b, k)  # warm-up: Triton compiles outside the capture
            torch.cuda.current_stream().synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                self._out[:b, : 2 * k + 1] = self._program(meta, tables, b, k)
            self._graph_pool = graph.pool()
            self.graphs[b, k] = graph
        torch.cuda.current_stream().synchronize()
        return bool(self._pending)

    def fits(self, seqs: list[Sequence], ks: list[int]) -> bool:
        """Every proposing sequence's draft cache is 1 or 2 tokens behind (the state after a step)."""
        return all(k == 0 or (s.draft_cached > 0 and s.num_tokens - s.draft_cached in (1, 2))
                   for s, k in zip(seqs, ks, strict=True))

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], ks: list[int], k: int) -> list[list[int]]:
        """Per sequence: the k draft tokens (those past ks[i] are junk), then the target's k + 1 argmaxes."""
        n = len(seqs)
        bucket = next((b for b in self.buckets if b >= n), n) if self.graphs else n
        meta, tables = (torch.from_numpy(a) for a in self._inputs(seqs, ks, k, bucket))
        if (graph := self.graphs.get((bucket, k))) is None:
            out = self._program(meta.to(self.target.device), tables.to(self.target.device), bucket, k)
        else:
            rows = meta.shape[1]
            self._host_meta[:, :rows].copy_(meta)
            self._host_tables[: 2 * bucket].copy_(tables)
            self._meta[:, :rows].copy_(self._host_meta[:, :rows], non_blocking=True)
            self._tables[: 2 * bucket].copy_(self._host_tables[: 2 * bucket], non_blocking=True)
            graph.replay()
            out = self._out[:, : 2 * k + 1]
        for s, ki in zip(seqs, ks, strict=True):
            if ki:
                s.draft_cached = s.num_tokens + ki - 1  # the engine clamps it to what is accepted
        return out[:n].tolist()

    def _inputs(self, seqs: list[Sequence], ks: list[int], k: int, bucket: int) -> tuple[np.ndarray, ...]:
        """meta, and the tables [2 * bucket, max_blocks]: the draft's per sequence, then the target's."""
        n, bs = len(seqs), self.block_size
        tables = np.zeros((2, bucket, self.max_blocks), np.int32)
        last = np.zeros(bucket, np.int64)      # position of each sequence's last token
        kk = np.zeros(bucket, np.int64)        # how many tokens it proposes
        pair = np.zeros((bucket, 2), np.int64)  # its last two tokens
        behind2 = np.zeros(bucket, bool)       # the draft lacks both of them
        packed = np.zeros(bucket, np.int64)    # the target's packed pages and tail start
        tail_start = np.zeros(bucket, np.int64)
        for i, s in enumerate(seqs):
            tables[0, i, : len(s.draft_blocks)] = s.draft_blocks
            tables[1, i, : len(s.blocks)] = s.blocks
            last[i], kk[i] = s.num_tokens - 1, ks[i]
            pair[i] = s.token_ids[-2:]
            behind2[i] = s.num_tokens - s.draft_cached == 2
            packed[i], tail_start[i] = s.packed_pages, s.tail_start
        seq = np.arange(bucket)
        steps = np.arange(1, k)
        width = np.arange(k + 1)
        sections = [  # (sequence of each row, position, fed or not, token), rows in input order
            (np.repeat(seq, 2), (last[:, None] + [-1, 0]).ravel(),
             np.stack([behind2 & (kk > 0), kk > 0], 1).ravel(), pair.ravel()),
            (np.tile(seq, k - 1), (last[None, :] + steps[:, None]).ravel(),
             (steps[:, None] < kk[None, :]).ravel(), np.zeros(bucket * (k - 1), np.int64)),
            (np.repeat(seq, k + 1), (last[:, None] + width).ravel(),
             ((width[None, :] <= kk[:, None]) & (seq < n)[:, None]).ravel(),
             np.stack([pair[:, 1], *[np.zeros(bucket, np.int64)] * k], 1).ravel()),
        ]
        row_seq, pos, fed, tokens = (np.concatenate(parts) for parts in zip(*sections, strict=True))
        pos = np.where(fed, pos, 0)
        # Draft rows index the draft's cache by position; verification rows the target's native tail.
        target = np.arange(len(pos)) >= (k + 1) * bucket
        start = np.where(target, tail_start[row_seq], 0)
        page = np.where(target, packed[row_seq], 0) + (pos - start) // bs
        slot = tables[target.astype(np.int64), row_seq, page].astype(np.int64) * bs + (pos - start) % bs
        meta = np.stack([np.where(fed, tokens, 0), pos, np.where(fed, slot, self.scratch_slot),
                         np.where(fed, pos + 1 - start, 0), np.where(target, packed[row_seq], 0)])
        return meta, tables.reshape(2 * bucket, self.max_blocks)

    def _program(self, meta: Tensor, tables: Tensor, bucket: int, k: int) -> Tensor:
        """[bucket, 2k + 1]: the k drafts, then the target's argmax at each of the k + 1 positions."""
        b = bucket
        catch_up, steps, verify = meta[:, : 2 * b], meta[:, 2 * b : (k + 1) * b], meta[:, (k + 1) * b :]
        draft_tables, target_tables = tables[:b], tables[b:]
        logits = _forward(self.draft, catch_up[0], catch_up, draft_tables.repeat_interleave(2, 0))
        drafts = [logits.view(b, 2, -1)[:, 1].argmax(-1)]
        for j in range(k - 1):
            rows = steps[:, j * b : (j + 1) * b]
            drafts.append(_forward(self.draft, drafts[-1], rows, draft_tables).argmax(-1))
        drafts = torch.stack(drafts, 1)
        tokens = torch.cat([verify[0].view(b, k + 1)[:, :1], drafts], 1).flatten()
        scores = _forward(self.target, tokens, verify, target_tables.repeat_interleave(k + 1, 0))
        return torch.cat([drafts, scores.view(b, k + 1, -1).argmax(-1)], 1)


def _forward(runner: ModelRunner, tokens: Tensor, meta: Tensor, tables: Tensor) -> Tensor:
    batch = ForwardBatch(meta[1], meta[2], block_tables=tables, context_lens=meta[3].int(),
                         packed_pages=meta[4].int())
    return runner.model(tokens, batch, runner.pool)
