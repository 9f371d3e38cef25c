"""The quality probe: how far the current knobs move the model's next-token distributions.

A fixed probe set of texts is teacher-forced through the model along the serving path: each text's
first half is prefilled into the paged KV cache, its second half is fed on top of that cache as one
chunk (the path speculative verification takes), so a compressed cache or quantized weights show up
here exactly as they would in requests. The reference is the same run under 16-bit weights and an
uncompressed cache, computed once and cached on disk, keyed by the model's and the probe's hashes.

top1 = share of positions whose argmax agrees with the reference's; kl = mean KL(reference ‖ current).
"""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class QualityReport:
    top1: float       # argmax agreement with the reference, 0..1
    kl: float         # mean KL(reference ‖ current), nats
    positions: int    # probe positions compared
    seconds: float    # time the probe took


def probe_key(model_folder: Path, dtype: torch.dtype, token_ids: list[list[int]]) -> str:
    """What the reference depends on: the checkpoint (config and weight files' names and sizes), the
    dtype of the 16-bit run and the probe's tokens."""
    h = hashlib.sha256((model_folder / "config.json").read_bytes())
    for f in sorted(model_folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(str(dtype).encode())
    h.update(json.dumps(token_ids).encode())
    return h.hexdigest()[:24]


def compare(reference: Tensor, current: Tensor) -> tuple[float, float]:
    """Log-probabilities [positions, vocab] of the reference and the current run -> (top1, kl)."""
    top1 = (reference.argmax(-1) == current.argmax(-1)).float().mean().item()
    kl = F.kl_div(current, reference, log_target=True, reduction="none").sum(-1).mean().item()
    return top1, max(kl, 0.0)


class ReferenceStore:
    """Reference log-probabilities (and small JSON results such as per-layer sensitivity) by key, in
    memory and (when given a folder) on disk."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._memory: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor | None:
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{key}.pt" if self.folder else None
        if path is not None and path.is_file():
            self._memory[key] = torch.load(path, map_location="cpu", weights_only=True)
            return self._memory[key]
        return None

    def put(self, key: str, logprobs: Tensor) -> None:
        self._memory[key] = logprobs
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f"{key}.pt.tmp"
            torch.save(logprobs, tmp)
            tmp.replace(self.folder / f"{key}.pt")  # atomic: a crash never leaves half a reference


    def get_json(self, key: str):
        path = self.folder / f"{key}.json" if self.folder else None
        if key in self._memory:
            return self._memory[key]
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    def put_json(self, key: str, value) -> None:
        self._memory[key] = value
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f"{key}.json.tmp"
            tmp.write_text(json.dumps(value))
            tmp.replace(self.folder / f"{key}.json")


def timed_report(reference: Tensor, current: Tensor, started: float) -> QualityReport:
    top1, kl = compare(reference, current)
    return QualityReport(top1, kl, reference.shape[0], time.perf_counter() - started)
