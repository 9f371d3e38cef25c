"""The four runtime knobs and the outcome of changing them."""

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Knobs:
    spec_length: int = 0
    kv_compression: float = 0.0
    weight_bits: float = 16.0
    max_batch_size: int = 1

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class KnobOutcome:
    name: str
    status: str                     # "applied" | "rejected" | "rolled_back"
    value: float | int | None       # the value in force afterwards
    requested: object = None
    reason: str = ""
    cost_s: float = 0.0


@dataclass
class ApplyResult:
    outcomes: dict[str, KnobOutcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.status == "applied" for o in self.outcomes.values())

    def __getitem__(self, name: str) -> KnobOutcome:
        return self.outcomes[name]


def check_knob(name: str, value, *, max_num_seqs: int, max_spec_length: int, has_drafter: bool) -> str | None:
    """Why `value` cannot be applied to knob `name` by this engine, or None if it can."""
    if name not in Knobs.names():
        return f"unknown knob {name!r} (knobs: {', '.join(Knobs.names())})"
    if name == "weight_bits":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 4 <= value <= 16:
            return f"weight_bits must be a number in 4..16 (average bits per weight), got {value!r}"
        return None
    if name == "kv_compression":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            return f"kv_compression must be a number in [0, 1) (fraction of KV bytes saved), got {value!r}"
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} must be an integer, got {value!r}"
    if name == "spec_length":
        if not has_drafter:
            return "spec_length needs a drafter: start the engine with draft_model set"
        if not 0 <= value <= max_spec_length:
            return f"spec_length must be in 0..{max_spec_length}, got {value}"
    elif not 1 <= value <= max_num_seqs:
        return f"max_batch_size must be in 1..{max_num_seqs} (max_num_seqs), got {value}"
    return None
