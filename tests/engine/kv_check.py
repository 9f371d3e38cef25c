"""Checking a sequence's cache against the K/V a fresh prefill of its tokens computes."""

import torch
from torch import Tensor

from optd.engine import Engine, SamplingParams
from optd.engine.kv_cache import KVPool
from optd.engine.runner import ModelRunner
from optd.engine.sequence import Sequence


def fresh_kv(engine: Engine, tokens: list[int]) -> Tensor:
    """K/V [layers, 2, len, kv_heads, D] that a prefill of `tokens` with the model's current weights
    writes into a native cache: a pool of its own, so the engine's may be full. Engine thread."""
    layout = engine.pool.layout
    blocks = list(range(1, -(-len(tokens) // layout.block_size) + 1))
    pool = KVPool(layout, len(blocks) + 1, engine.device)
    runner = ModelRunner(engine.model, pool, 1, engine.max_model_len, use_cuda_graphs=False)
    probe = engine.make_sequence(tokens, SamplingParams(max_tokens=1))
    probe.blocks = blocks
    runner.prefill([probe])
    kv = pool.read_native(torch.tensor(blocks, device=pool.device))  # [L, nb, 2, bs, H, D]
    L, nb, _, bs, H, D = kv.shape
    return kv.permute(0, 2, 1, 3, 4, 5).reshape(L, 2, nb * bs, H, D)[:, :, : len(tokens)]


def stored_vs_truth(engine: Engine, seq: Sequence) -> float:
    """Largest error of the sequence's stored K/V (dequantized, packed pages then tail) against the K/V
    a fresh 16-bit prefill of its tokens computes, relative to the largest magnitude. Valid while no
    token was evicted (the stored tokens are then every position, in order). Engine thread."""
    stored = engine.compressor._stored(seq).float()  # [L, 2, n, H, D]
    truth = fresh_kv(engine, seq.token_ids[: seq.num_cached]).float()
    assert stored.shape == truth.shape
    return float((stored - truth).abs().max() / truth.abs().max())
