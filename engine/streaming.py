"""From sampled tokens to what a request's consumer sees: text deltas, stop conditions, latencies."""

import logging
from collections import deque
from collections.abc import Callable

from optd.engine.outputs import Delta, EngineStats
from optd.engine.sequence import Sequence
from optd.engine.tokenizer import Tokenizer

log = logging.getLogger("optd.engine")
Sink = Callable[[Delta], None]


class OutputStream:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, counters: EngineStats):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.counters = counters
        self.latency = {k: deque(maxlen=1024) for k in ("ttft_s", "itl_s", "e2e_s")}
        self.sinks: dict[str, Sink] = {}

    def on_token(self, seq: Sequence, token: int, now: float) -> str | None:
        """Record a new token; returns why the sequence is finished, or streams a delta."""
        self.counters.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        else:
            self.latency["itl_s"].append(now - seq.last_token_time)
        seq.last_token_time = now
        p = seq.params
        seq.text += seq.detokenizer.step(seq.token_ids)
        if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            return "stop"
        if p.stop and (cut := _find_stop(seq.text, p.stop, seq.emitted)) is not None:
            seq.text = seq.text[:cut]
            return "stop"
        if seq.num_generated >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        # Hold back text that could be the start of a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        self._emit(seq, len(seq.text) - hold, [token])
        return None

    def on_finish(self, seq: Sequence, now: float, error: str | None = None) -> None:
        """The final delta: the rest of the text, the last token unless aborted, the reason."""
        self.counters.requests_finished_total += 1
        if seq.first_token_time is not None:
            self.latency["ttft_s"].append(seq.first_token_time - seq.arrival_time)
            self.latency["e2e_s"].append(now - seq.arrival_time)
        new = seq.token_ids[-1:] if seq.finish_reason in ("stop", "length") and seq.num_generated else []
        self._emit(seq, len(seq.text), new, finish_reason=seq.finish_reason, error=error)
        self.sinks.pop(seq.request_id, None)

    def _emit(self, seq: Sequence, upto: int, token_ids: list[int], **final) -> None:
        text = seq.text[seq.emitted : max(upto, seq.emitted)]
        seq.emitted = max(upto, seq.emitted)
        sink = self.sinks.get(seq.request_id)
        if sink is None:
            return
        try:
            sink(Delta(seq.request_id, text, token_ids, prompt_tokens=seq.prompt_len,
                       completion_tokens=seq.num_generated, **final))
        except Exception:  # e.g. the consumer's event loop is gone; its request is aborted
            log.warning("dropping output of %s: its consumer failed", seq.request_id, exc_info=True)
            self.sinks.pop(seq.request_id, None)


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index where the first stop string starts, looking only where a new match could be."""
    hits = [i for s in stops if (i := text.find(s, max(emitted - len(s) + 1, 0))) >= 0]
    return min(hits) if hits else None
