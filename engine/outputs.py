"""What the engine hands back: finished requests, streamed deltas, counters."""

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None       # "stop" | "length" | "abort" | "error"
    ttft_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None


@dataclass
class Delta:
    """A piece of a streamed request; the last one has finish_reason set."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class EngineStats:
    requests_running: int = 0
    requests_waiting: int = 0
    requests_finished_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    preemptions_total: int = 0
    steps_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_bytes_per_token: int = 0
    kv_compression_achieved: float = 0.0
    weight_bytes: int = 0
    spec_drafts_total: int = 0
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    step_time_s: dict[int, float] = field(default_factory=dict)  # decode step time by spec_length
    # Latencies (seconds) of recently finished requests, oldest first, bounded.
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
