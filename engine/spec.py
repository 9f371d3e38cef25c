"""Verifying draft tokens against the target so that outputs keep exactly the target's distribution.

Greedy: a draft token is accepted while it equals the target's argmax; the first mismatch is replaced
by the target's choice. Sampling (speculative sampling, Leviathan et al. / Chen et al.): draft token d
drawn from the draft's p is accepted with probability min(1, q(d) / p(d)) under the target's q; on
rejection the token is drawn from max(q - p, 0), renormalized; when every draft is accepted a bonus
token is drawn from the target's next distribution. Either way one step yields 1..k+1 tokens.
"""

import torch
from torch import Tensor

from optd.engine.sampler import filtered_probs
from optd.engine.sequence import Sequence


def accept_probability(q_d: Tensor, p_d: Tensor) -> Tensor:
    """Chance of keeping a draft token: target probability over draft probability, capped at 1."""
    return torch.clamp(q_d / p_d, max=1.0)


def verify_greedy(drafts: list[int], target_argmax: list[int]) -> list[int]:
    for j, d in enumerate(drafts):
        if d != target_argmax[j]:
            return [*drafts[:j], target_argmax[j]]
    return [*drafts, target_argmax[len(drafts)]]


def verify_sampled(seq: Sequence, drafts: list[int], draft_probs: Tensor | None, logits: Tensor) -> list[int]:
    """logits: the target's [len(drafts) + 1, vocab]; draft_probs: [len(drafts), vocab], or None for a
    drafter that proposes deterministically (its distribution is one-hot on the proposal)."""
    p = seq.params
    q = filtered_probs(logits, p.temperature, p.top_k, p.top_p)
    g = seq.generator
    for j, d in enumerate(drafts):
        p_d = torch.ones((), device=q.device) if draft_probs is None else draft_probs[j, d]
        if torch.rand((), generator=g, device=q.device) < accept_probability(q[j, d], p_d):
            continue
        if draft_probs is None:
            residual = q[j].clone()
            residual[d] = 0.0
        else:
            residual = torch.clamp(q[j] - draft_probs[j], min=0.0)
        if residual.sum() <= 0:  # q == p exactly: any token of q is right
            residual = q[j]
        token = torch.multinomial(residual / residual.sum(), 1, generator=g).item()
        return [*drafts[:j], token]
    return [*drafts, torch.multinomial(q[len(drafts)], 1, generator=g).item()]
