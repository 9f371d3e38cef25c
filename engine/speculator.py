"""One speculative step: draft up to k tokens per sequence, verify them all in one target forward."""

import torch

from optd.engine.config import EngineConfig, EngineError
from optd.engine.drafter import ModelDrafter, NgramDrafter
from optd.engine.fused_spec import FusedGreedySpec
from optd.engine.outputs import EngineStats
from optd.engine.runner import ModelRunner
from optd.engine.sequence import Sequence
from optd.engine.spec import verify_greedy, verify_sampled

Drafter = NgramDrafter | ModelDrafter


def make_drafter(config: EngineConfig, target, num_blocks: int) -> Drafter | None:
    """`target` is the Engine under construction (its tokenizer, config, device and dtype)."""
    if config.draft_model is None:
        return None
    if not 0 <= config.max_spec_length <= 32:
        raise EngineError(f"max_spec_length must be in 0..32, got {config.max_spec_length}")
    if config.draft_model == "ngram":
        return NgramDrafter()
    return ModelDrafter(
        config.draft_model,
        target.tokenizer,
        target.model_config,
        num_blocks,
        target.device,
        target.dtype,
        config.block_size,
        config.max_num_seqs,
        target.max_model_len,
        config.cuda_graphs,
    )


class Speculator:
    def __init__(self, drafter: Drafter, runner: ModelRunner, max_model_len: int, counters: EngineStats,
                 max_k: int, cuda_graphs: bool):
        self.drafter, self.runner = drafter, runner
        # Greedy steps with a draft model run as one program (one CUDA graph per bucket and k).
        self.fused = None
        if isinstance(drafter, ModelDrafter) and max_k > 0:
            self.fused = FusedGreedySpec(runner, drafter.runner, max_k, cuda_graphs)
        self.max_model_len = max_model_len
        self.counters = counters

    def prefill(self, seqs: list[Sequence]) -> None:
        """Fill the draft's cache alongside the target's, so the first speculative step can be fused."""
        if isinstance(self.drafter, ModelDrafter):
            self.drafter.prefill(seqs)

    def step(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        """New tokens per sequence: the accepted drafts plus one token from the target."""
        # Sequences near max_tokens or max_model_len propose fewer.
        ks = [
            max(min(k, s.params.max_tokens - s.num_generated - 1, self.max_model_len - s.num_tokens - 1), 0)
            for s in seqs
        ]
        if self.fused and max(ks) > 0 and all(s.params.temperature == 0 for s in seqs) \
                and self.fused.fits(seqs, ks):
            return self._step_fused(seqs, ks, k)
        drafts, draft_probs = self.drafter.propose(seqs, ks)
        chunks = [(s.num_tokens - 1, [s.token_ids[-1], *d]) for s, d in zip(seqs, drafts, strict=True)]
        logits = self.runner.extend(seqs, chunks, width=k + 1)
        argmax = torch.cat([rows.argmax(-1) for rows in logits]).tolist()
        out, first = [], 0
        for seq, d, dp, rows in zip(seqs, drafts, draft_probs, logits, strict=True):
            if seq.params.temperature == 0:
                tokens = verify_greedy(d, argmax[first : first + len(d) + 1])
            else:
                tokens = verify_sampled(seq, d, dp, rows)
            first += len(d) + 1
            if d:
                self._count(len(d), accepted=len(tokens) - 1)
            out.append(tokens)
        return out

    def _step_fused(self, seqs: list[Sequence], ks: list[int], k: int) -> list[list[int]]:
        out = []
        for row, ki in zip(self.fused.run(seqs, ks, k), ks, strict=True):
            tokens = verify_greedy(row[:ki], row[k : k + ki + 1])
            if ki:
                self._count(ki, accepted=len(tokens) - 1)
            out.append(tokens)
        return out

    def _count(self, drafted: int, accepted: int) -> None:
        c = self.counters
        c.spec_drafts_total += 1
        c.spec_draft_tokens_total += drafted
        c.spec_accepted_tokens_total += accepted
        for j in range(accepted):
            c.spec_accepted_per_pos[j] += 1
