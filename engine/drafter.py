"""Drafters propose up to k tokens per sequence for the target to verify.

`propose(seqs, ks)` returns, per sequence, the proposed tokens (at most ks[i]) and their draft
distributions ([len, vocab], or None when the proposal is deterministic).
"""

import torch
from torch import Tensor

from optd.engine.config import EngineError
from optd.engine.kv_cache import KVLayout, KVPool
from optd.engine.loader import load_model, resolve_model_path
from optd.engine.model_config import ModelConfig
from optd.engine.runner import ModelRunner
from optd.engine.sampler import filtered_probs
from optd.engine.sequence import Sequence
from optd.engine.tokenizer import Tokenizer

Proposal = tuple[list[list[int]], list[Tensor | None]]


class NgramDrafter:
    """Prompt lookup: continue the most recent earlier occurrence of the sequence's last n tokens."""

    def __init__(self, max_ngram: int = 3, window: int = 2048):
        self.max_ngram, self.window = max_ngram, window

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposal:
        return [self._lookup(s.token_ids, k) for s, k in zip(seqs, ks, strict=True)], [None] * len(seqs)

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        if k == 0:
            return []
        first = max(len(tokens) - self.window, 0)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            suffix = tokens[-n:]
            for i in range(len(tokens) - n - 1, first - 1, -1):  # most recent match first
                if tokens[i : i + n] == suffix:
                    return tokens[i + n : i + n + k]
        return []


class ModelDrafter:
    """A smaller model sharing the target's tokenizer. Its KV pool is its own, indexed by each
    sequence's `draft_blocks` (position-aligned, never compressed), which the scheduler allocates,
    preempts and rolls back together with the target's; `seq.draft_cached` counts the tokens whose
    draft K/V is valid."""

    def __init__(
        self,
        name: str,
        target_tokenizer: Tokenizer,
        target_config: ModelConfig,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        cuda_graphs: bool,
    ):
        folder = resolve_model_path(name)
        cfg = ModelConfig.from_file(folder / "config.json")
        if Tokenizer(folder).vocab() != target_tokenizer.vocab():
            raise EngineError(f"draft model {name!r}: its tokenizer differs from the target's")
        if cfg.vocab_size != target_config.vocab_size:
            raise EngineError(
                f"draft model {name!r}: vocab_size {cfg.vocab_size} differs from the target's "
                f"{target_config.vocab_size}"
            )
        self.model = load_model(folder, cfg, device, dtype, max_model_len)
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype)
        self.pool = KVPool(layout, num_blocks, device)
        # Catching up after a step feeds 1 token (a draft was rejected) or 2 (all were accepted).
        self.runner = ModelRunner(self.model, self.pool, max_num_seqs, max_model_len, cuda_graphs, (1, 2),
                                  draft=True)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposal:
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[Tensor]] = [[] for _ in seqs]
        active = [i for i, k in enumerate(ks) if k > 0]
        logits = self._catch_up([seqs[i] for i in active])
        for step in range(max(ks, default=0)):
            greedy = logits.argmax(-1).tolist()  # one sync for the batch
            for row, i in enumerate(active):
                params = seqs[i].params
                if params.temperature == 0:
                    drafts[i].append(greedy[row])
                    continue
                p = filtered_probs(logits[row], params.temperature, params.top_k, params.top_p)
                drafts[i].append(int(torch.multinomial(p, 1, generator=seqs[i].generator)))
                probs[i].append(p)
            active = [i for i in active if len(drafts[i]) < ks[i]]
            if not active:
                break
            # Feed each draft token at the position after the sequence's last token plus earlier drafts.
            chunks = [(seqs[i].num_tokens + step, drafts[i][-1:]) for i in active]
            logits = torch.cat(self.runner.extend([seqs[i] for i in active], chunks, width=1))
        for s, d in zip(seqs, drafts, strict=True):
            if d:
                s.draft_cached = s.num_tokens + len(d) - 1  # the engine clamps it to what is accepted
        return drafts, [torch.stack(p) if p else None for p in probs]

    def prefill(self, seqs: list[Sequence]) -> None:
        self._catch_up(seqs)

    def _catch_up(self, seqs: list[Sequence]) -> Tensor:
        """Bring each sequence's draft cache up to its tokens; returns the last row's logits each."""
        if not seqs:
            return torch.empty(0)
        fresh = [s for s in seqs if s.draft_cached == 0]
        rest = [s for s in seqs if s.draft_cached > 0]
        rows: dict[int, Tensor] = {}
        if fresh:
            for s, row in zip(fresh, self.runner.prefill(fresh), strict=True):
                rows[id(s)] = row
        if rest:
            chunks = [(s.draft_cached, s.token_ids[s.draft_cached :]) for s in rest]
            longest = max(len(toks) for _, toks in chunks)
            width = longest if longest <= 2 else None
            for s, out in zip(rest, self.runner.extend(rest, chunks, width=width), strict=True):
                rows[id(s)] = out[-1]
        for s in seqs:
            s.draft_cached = s.num_tokens
        return torch.stack([rows[id(s)] for s in seqs])
