"""Start-up configuration of the engine and per-request sampling parameters."""

from dataclasses import dataclass, field


class EngineError(ValueError):
    """Bad input to the engine (a request, a checkpoint, a config); the message names the culprit."""


@dataclass
class EngineConfig:
    model: str                          # Hugging Face checkpoint folder, or "demo"
    draft_model: str | None = None      # folder, "demo-draft", "ngram" or None (issue 3)
    device: str = "auto"                # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"                 # "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16", "float16"
    max_model_len: int | None = None    # None: min(model's max positions, 4096)
    max_num_seqs: int = 64              # envelope of the max_batch_size knob
    max_spec_length: int = 8            # envelope of the spec_length knob
    block_size: int = 16                # tokens per KV-cache block
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: sized from free memory
    num_kv_blocks: int | None = None    # overrides kv_cache_memory (tests use it to force preemption)
    gpu_memory_utilization: float = 0.85
    max_num_batched_tokens: int = 4096  # prefill token budget per step
    cuda_graphs: bool = True            # decode replays CUDA graphs (CUDA/ROCm only)
    seed: int = 0
    quality_cache_dir: str | None = None  # where probe references are kept; None: in memory only


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                      # 0: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise EngineError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {self.top_k!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise EngineError(f"stop must be a list of non-empty strings, got {self.stop!r}")
