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
