"""Next-token choice per request: greedy, or temperature / top-k / top-p sampling with its own RNG."""

import torch
from torch import Tensor

from optd.engine.sequence import Sequence
from optd.kernels.argmax import argmax_rows


def filtered_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Sampling distribution of rows of logits [..., vocab] under the request's parameters."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs /= probs.sum(-1, keepdim=True)
    return probs


def sample_tokens(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """logits: [len(seqs), vocab] float32; the tokens, on the logits' device (no host sync)."""
    tokens = argmax_rows(logits)
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature > 0:
            probs = filtered_probs(logits[i], p.temperature, p.top_k, p.top_p)
            tokens[i] = torch.multinomial(probs, 1, generator=seq.generator)[0]
    return tokens


def sample(logits: Tensor, seqs: list[Sequence]) -> list[int]:
    return sample_tokens(logits, seqs).tolist()


class PendingTokens:
    """Tokens sampled on the device, on their way to the host: the copy is queued behind the step that
    samples them, so the host can prepare (and launch) the next step before they arrive."""

    def __init__(self, tokens: Tensor):
        self.device = tokens
        self._ready: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tokens

    def wait(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()
