"""One request's state inside the engine."""

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from optd.engine.config import SamplingParams
from optd.engine.tokenizer import Detokenizer


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    detokenizer: Detokenizer
    generator: torch.Generator | None = None  # per-request RNG: same seed, same output
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)  # packed pages, then the native tail (kv_cache)
    packed_pages: int = 0         # quantized pages at the front of `blocks` (the kv_compression knob)
    tail_start: int = 0           # position of the first token in the native tail that follows them
    draft_blocks: list[int] = field(default_factory=list)  # the draft model's cache, by position
    num_cached: int = 0           # tokens whose K/V are in the cache
    draft_cached: int = 0         # tokens whose K/V are in the draft model's cache
    text: str = ""
    emitted: int = 0              # characters of `text` already streamed
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]
