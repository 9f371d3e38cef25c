"""Turns a scheduled step into model inputs and runs it; decode replays CUDA graphs on GPUs.

A decode step at small batch is a few hundred tiny kernels; launching them one by one from Python
would cost more than reading the weights. So at start-up one graph is captured per batch-size
bucket, with static input buffers; a step copies its inputs in, pads to the bucket and replays.
Padded rows write their K/V into the pool's scratch block and attend to nothing.
"""

import torch
from torch import Tensor

from optd.engine.kv_cache import KVPool
from optd.engine.model import ForwardBatch, LlamaModel
from optd.engine.sequence import Sequence


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool):
        self.model, self.pool = model, pool
        self.device = model.embed.weight.device
        self.block_size = pool.layout.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_cuda_graphs and self.device.type == "cuda":
            self._capture(batch_buckets(max_num_seqs))

    def _slots(self, seq: Sequence, start: int, end: int) -> Tensor:  # prefill
        pos = torch.arange(start, end)
        return torch.tensor(seq.blocks)[pos // self.block_size] * self.block_size + pos % self.block_size

    def _to_device(self, *tensors: Tensor) -> list[Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> Tensor:
        """Whole sequences from position 0 (new prompts, or preempted ones being recomputed)."""
        lens = [s.num_tokens for s in seqs]
        ids = torch.tensor([t for s in seqs for t in s.token_ids])
        positions = torch.cat([torch.arange(n) for n in lens])
        slots = torch.cat([self._slots(s, 0, s.num_tokens) for s in seqs])
        last_rows = torch.tensor(lens).cumsum(0) - 1
        ids, positions, slots, last_rows = self._to_device(ids, positions, slots, last_rows)
        batch = ForwardBatch(positions, slots, prefill_lens=lens, logits_rows=last_rows)
        return self.model(ids, batch, self.pool)

    def _decode_inputs(self, seqs: list[Sequence], rows: int) -> tuple[Tensor, Tensor]:
        """Host tensors for a decode of `rows` rows (padding rows write to scratch and attend to nothing):
        meta [4, rows] = token id, position, cache slot, context length; tables [rows, max_blocks]."""
        bs, scratch = self.block_size, self.pool.scratch_block * self.block_size
        meta = [[0] * rows, [0] * rows, [scratch] * rows, [0] * rows]
        tables = []
        for i, s in enumerate(seqs):
            pos = s.num_tokens - 1
            meta[0][i], meta[1][i], meta[3][i] = s.token_ids[-1], pos, s.num_tokens
            meta[2][i] = s.blocks[pos // bs] * bs + pos % bs
            tables.append(s.blocks + [0] * (self.max_blocks - len(s.blocks)))
        tables += [[0] * self.max_blocks] * (rows - len(seqs))
        return torch.tensor(meta), torch.tensor(tables, dtype=torch.int32)

    def _decode_forward(self, meta: Tensor, tables: Tensor) -> Tensor:
        batch = ForwardBatch(meta[1], meta[2], block_tables=tables, context_lens=meta[3].int())
        return self.model(meta[0], batch, self.pool)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> Tensor:
        """One new token per sequence: the last sampled one, whose K/V is not cached yet."""
        n = len(seqs)
        bucket = next((b for b in sorted(self.graphs) if b >= n), None)
        meta, tables = self._decode_inputs(seqs, bucket or n)
        if bucket is None:
            return self._decode_forward(meta.to(self.device), tables.to(self.device))
        self._meta[:, :bucket].copy_(meta, non_blocking=True)
        self._tables[:bucket].copy_(tables, non_blocking=True)
        self.graphs[bucket].replay()
        return self._logits[:n]

    def _capture(self, buckets: list[int]) -> None:
        B, dev = max(buckets), self.device
        self._meta = torch.zeros(4, B, dtype=torch.long, device=dev)
        self._tables = torch.zeros(B, self.max_blocks, dtype=torch.int32, device=dev)
        self._logits = torch.empty(B, self.model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self._meta[2] = self.pool.scratch_block * self.block_size
        pool = None
        with torch.inference_mode():
            for b in sorted(buckets, reverse=True):
                meta, tables = self._meta[:, :b], self._tables[:b]
                self._decode_forward(meta, tables)  # warm-up: Triton compiles outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._logits[:b] = self._decode_forward(meta, tables)
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize()
