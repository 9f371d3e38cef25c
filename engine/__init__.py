"""The inference engine: model, loader, tokenizer, paged KV cache, scheduler, knobs."""

from optd.engine.config import EngineConfig, EngineError, SamplingParams
from optd.engine.engine import Engine
from optd.engine.knobs import ApplyResult, KnobOutcome, Knobs
from optd.engine.outputs import Delta, EngineStats, RequestOutput
from optd.engine.quality import QualityReport

__all__ = [
    "ApplyResult",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "KnobOutcome",
    "Knobs",
    "QualityReport",
    "RequestOutput",
    "SamplingParams",
]
