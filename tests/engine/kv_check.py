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


def relative_error(stored: Tensor, truth: Tensor) -> float:
    """Largest error of stored K/V against the truth, relative to the truth's largest magnitude."""
    stored, truth = stored.float(), truth.float()
    assert stored.shape == truth.shape
    return float((stored - truth).abs().max() / truth.abs().max())


def stored_vs_truth(engine: Engine, seq: Sequence) -> float:
    """Largest error of the sequence's stored K/V (dequantized, packed pages then tail) against the K/V
    a fresh 16-bit prefill of its tokens computes, relative to the largest magnitude. Valid while no
    token was evicted (the stored tokens are then every position, in order). Engine thread."""
    stored = engine.compressor._stored(seq)  # [L, 2, n, H, D]
    return relative_error(stored, fresh_kv(engine, seq.token_ids[: seq.num_cached]))


class StoredSnapshots:
    """What stored_vs_truth checks, for many checks of the same sequences: each check copies what the
    sequences hold (engine thread), and errors() compares every copy afterwards with one fresh prefill
    per sequence. The K/V at a position depend only on the tokens up to it, so the prefill of the
    longest prefix a sequence was copied at is the truth for each of its shorter copies too; one prefill
    per check instead was most of the time of a test that checks dozens of times."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.taken: list[tuple[Sequence, Tensor]] = []

    def take(self, seqs: list[Sequence]) -> None:
        """Engine thread. Valid while no token was evicted, as for stored_vs_truth."""
        self.taken += [(s, self.engine.compressor._stored(s)) for s in seqs]

    def errors(self) -> list[float]:
        """One error per copy taken, as stored_vs_truth gives it."""
        longest: dict[Sequence, int] = {}
        for seq, stored in self.taken:
            longest[seq] = max(stored.shape[2], longest.get(seq, 0))
        truth = {seq: self.engine._call(lambda s=seq, n=n: fresh_kv(self.engine, s.token_ids[:n]))
                 for seq, n in longest.items()}
        return [relative_error(stored, truth[seq][:, :, : stored.shape[2]]) for seq, stored in self.taken]
