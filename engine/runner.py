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

    def _slots(self, seq: Sequence, start: int, end: int) -> Tensor:
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

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> Tensor:
        """One new token per sequence: the last sampled one, whose K/V is not cached yet."""
        n = len(seqs)
        ids = torch.tensor([s.token_ids[-1] for s in seqs])
        positions = torch.tensor([s.num_tokens - 1 for s in seqs])
        slots = torch.cat([self._slots(s, s.num_tokens - 1, s.num_tokens) for s in seqs])
        context = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32)
        tables = torch.zeros(n, self.max_blocks, dtype=torch.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        bucket = next((b for b in sorted(self.graphs) if b >= n), None)
        if bucket is None:
            ids, positions, slots, context, tables = self._to_device(ids, positions, slots, context, tables)
            return self.model(ids, ForwardBatch(positions, slots, block_tables=tables, context_lens=context),
                              self.pool)
        st = self._static
        st["ids"][:n].copy_(ids)
        st["positions"][:n].copy_(positions)
        st["slots"][:n].copy_(slots)
        st["context"][:n].copy_(context)
        st["tables"][:n].copy_(tables)
        self._pad(n, bucket)
        self.graphs[bucket].replay()
        return st["logits"][:n]

    def _pad(self, n: int, bucket: int) -> None:
        st = self._static
        st["ids"][n:bucket] = 0
        st["positions"][n:bucket] = 0
        st["slots"][n:bucket] = self.pool.scratch_block * self.block_size
        st["context"][n:bucket] = 0

    def _capture(self, buckets: list[int]) -> None:
        B, dev = max(buckets), self.device
        st = self._static = {
            "ids": torch.zeros(B, dtype=torch.long, device=dev),
            "positions": torch.zeros(B, dtype=torch.long, device=dev),
            "slots": torch.zeros(B, dtype=torch.long, device=dev),
            "context": torch.zeros(B, dtype=torch.int32, device=dev),
            "tables": torch.zeros(B, self.max_blocks, dtype=torch.int32, device=dev),
        }
        logits = torch.empty(B, self.model.cfg.vocab_size, dtype=torch.float32, device=dev)
        st["logits"] = logits
        pool = None
        with torch.inference_mode():
            for b in sorted(buckets, reverse=True):
                self._pad(0, b)
                batch = ForwardBatch(st["positions"][:b], st["slots"][:b], block_tables=st["tables"][:b],
                                     context_lens=st["context"][:b])
                self.model(st["ids"][:b], batch, self.pool)  # warm-up: Triton compiles outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits[:b] = self.model(st["ids"][:b], batch, self.pool)
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize()
