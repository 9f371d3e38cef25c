"""The weight_bits knob: average bits per weight of the decoder's linear layers, 4..16, at runtime.

A change requantizes one decoder layer per engine-loop iteration, between steps, from the memory-mapped
checkpoint (optd.engine.loader.load_layer_weights), so requests keep flowing and no second 16-bit copy
of the model is ever held. Values between the formats (4, 8, 16) give each layer one of them:
`assign_bits` spends the bit budget where the measured sensitivity (the probe's KL with that layer
alone quantized) says it matters most. The embedding stays 16-bit; the lm_head is held in int8 (per
output channel) once the layers average 8 bits or fewer, where it is the largest single read of a step
(bench/RESULTS.md measures what it costs in quality). The KV pool grows into the bytes fewer bits free
and gives them back before more bits need them (Engine._start_switch).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from optd.engine.linear import BITS, Linear
from optd.engine.loader import load_layer_weights, load_tensor
from optd.engine.model import LlamaModel
from optd.engine.model_config import ModelConfig
from optd.kernels.quantize import quantize_int8, quantized_bytes

Sensitivity = dict[int, dict[int, float]]  # layer -> bits (4 or 8) -> KL with that layer alone at those bits


def layer_linears(model: LlamaModel, layer: int) -> dict[str, Linear]:
    return {f"layers.{layer}.{n}.weight": m for n, m in model.layers[layer].named_modules()
            if isinstance(m, Linear)}


def current_bits(model: LlamaModel) -> list[int]:
    return [next(iter(layer_linears(model, i).values())).bits for i in range(len(model.layers))]


def layers_nbytes(model: LlamaModel, bits: list[int]) -> int:
    """Bytes the decoder layers' linear weights take with layer i at bits[i] (from shapes alone)."""
    return sum(m.nbytes_at(b) for i, b in enumerate(bits) for m in layer_linears(model, i).values())


def head_bits_for(layer_bits: list[int]) -> int:
    return 8 if average_bits(layer_bits) <= 8 else 16


def head_bits(model: LlamaModel) -> int:
    return 16 if model.head_quant is None else 8


def head_nbytes(model: LlamaModel, bits: int) -> int:
    """Bytes the lm_head takes apart from the embedding at `bits` (a tied one shares it at 16)."""
    n, k, dtype = model.cfg.vocab_size, model.cfg.hidden_size, model.embed.weight.dtype
    if bits == 16:
        return 0 if model.lm_head is None else n * k * dtype.itemsize
    return quantized_bytes(n, k, bits, dtype)


def average_bits(bits: list[int]) -> float:
    return sum(bits) / len(bits)  # every layer has the same number of linear weights


def assign_bits(target: float, num_layers: int, sensitivity: Sensitivity | None) -> list[int]:
    """Bits per layer with an average as close to `target` as the formats allow without exceeding it,
    minimizing the summed sensitivity (a knapsack over layers, in units of 4 bits). Without a
    sensitivity, the damage of a layer is taken as doubling per bit removed, the earlier layers a little
    cheaper to quantize."""
    budget = int(target * num_layers + 1e-9) // 4  # in units of 4 bits; each layer costs 1, 2 or 4
    cost = {4: 1, 8: 2, 16: 4}

    def damage(layer: int, bits: int) -> float:
        if bits == 16:
            return 0.0
        if sensitivity is None:  # quantization error roughly doubles per bit removed
            return 2.0 ** (16 - bits) * (1 + layer / (10 * num_layers))
        return sensitivity[layer][bits]

    # best[b] = (damage, assignment) using exactly b units over the layers so far
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for layer in range(num_layers):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (dmg, bits) in best.items():
            for b in BITS:
                u = used + cost[b]
                if u > budget:
                    continue
                cand = (dmg + damage(layer, b), [*bits, b])
                if u not in nxt or cand[0] < nxt[u][0]:
                    nxt[u] = cand
        best = nxt
    if not best:
        raise ValueError(f"weight_bits {target} is below 4")
    top = max(best)  # spend the whole budget the formats allow
    return best[top][1]


HEAD = -1  # the lm_head's place in a switch's list of layers to swap


@dataclass
class WeightSwitch:
    """One change of weight_bits in progress: `step()` requantizes the next layer (or the lm_head) that
    changes."""

    model: LlamaModel
    folder: Path
    cfg: ModelConfig
    target: list[int]
    on_done: Callable[[str | None], None]   # called with None when done, or the reason it failed
    started: float = field(default_factory=time.perf_counter)
    previous: list[int] = field(init=False)
    todo: list[int] = field(init=False)
    swapped: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.previous = current_bits(self.model)
        self.todo = [i for i, (a, b) in enumerate(zip(self.previous, self.target, strict=True)) if a != b]
        self.head = (head_bits(self.model), head_bits_for(self.target))  # before, after
        if self.head[0] != self.head[1]:
            self.todo.append(HEAD)
        # Layers losing bits first: the weights never hold more bytes than at the start or the end (the
        # engine sizes the KV pool for the larger of the two).
        self.todo.sort(key=lambda i: self._bits(i, after=True) > self._bits(i, after=False))

    def _bits(self, i: int, after: bool) -> int:
        if i == HEAD:
            return self.head[after]
        return (self.target if after else self.previous)[i]

    def step(self) -> bool:
        """Swap one layer; True when the switch is over (done or rolled back)."""
        if not self.todo:
            self.on_done(None)
            return True
        layer = self.todo[0]
        try:
            self._set_layer(layer, self._bits(layer, after=True))
        except Exception as e:  # e.g. out of memory: put back what was changed, keep serving
            for i in [layer, *reversed(self.swapped)]:  # newest first: the bytes never exceed both ends
                self._set_layer(i, self._bits(i, after=False))
            self.on_done(f"{type(e).__name__}: {e}; rolled back to {average_bits(self.previous):g} bits")
            return True
        self.swapped.append(self.todo.pop(0))
        if not self.todo:
            self.on_done(None)
            return True
        return False

    def _set_layer(self, layer: int, bits: int) -> None:
        if layer == HEAD:
            set_head_bits(self.model, self.folder, bits)
        else:
            set_layer_bits(self.model, self.folder, self.cfg, layer, bits)


def set_layer_bits(model: LlamaModel, folder: Path, cfg: ModelConfig, layer: int, bits: int) -> None:
    """Requantize one decoder layer's linear layers to `bits` from the checkpoint's 16-bit weights."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    weights = load_layer_weights(folder, cfg, layer, device, dtype)
    for name, linear in layer_linears(model, layer).items():
        linear.set_bits(bits, weights[name])
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()  # memory freed by fewer bits becomes available at once


def set_head_bits(model: LlamaModel, folder: Path, bits: int) -> None:
    """Hold the lm_head in int8 (from its 16-bit weight, whose memory is then freed; a tied head keeps
    the embedding and adds the int8 copy) or back in 16 bits (an untied one re-read from the checkpoint)."""
    head, device, dtype = model.lm_head, model.embed.weight.device, model.embed.weight.dtype
    if bits == 16:
        model.head_quant = None
        if head is not None and head.weight.numel() == 0:
            w16 = load_tensor(folder, "lm_head.weight", device, dtype)
            head.weight = nn.Parameter(w16, requires_grad=False)
    elif model.head_quant is None:
        model.head_quant = quantize_int8(model.embed.weight if head is None else head.weight)
        if head is not None:
            head.weight = nn.Parameter(head.weight.new_empty(0), requires_grad=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
