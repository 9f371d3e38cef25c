"""Load a Hugging Face safetensors checkpoint into LlamaModel, one tensor at a time.

Parameters are allocated once, in the target dtype on the target device; each checkpoint tensor is
read from the memory-mapped file and copied into its (possibly fused) slot, so no second full copy
of the model ever exists in host memory.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from optd.engine.config import EngineError
from optd.engine.model import LlamaModel
from optd.engine.model_config import ModelConfig

DEMO_DIR = Path(__file__).parent / "demo"
BUNDLED = {"demo": DEMO_DIR / "target", "demo-draft": DEMO_DIR / "draft"}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def resolve_model_path(name: str) -> Path:
    path = BUNDLED.get(name, Path(name).expanduser())
    if not path.is_dir():
        raise EngineError(f"model {name!r}: no such checkpoint folder ({path})")
    return path


def _target(cfg: ModelConfig, name: str) -> tuple[str, int | None]:
    """Our parameter name for a checkpoint tensor, and its index within a fused parameter."""
    name = name.removeprefix("model.")
    name = name.replace("embed_tokens.", "embed.").replace("self_attn.", "attn.")
    name = name.replace("input_layernorm.", "input_norm.")
    name = name.replace("post_attention_layernorm.", "post_attn_norm.")
    fused = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2),
             "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1)}
    for part, (new, index) in fused.items():
        if f".{part}." in name:
            return name.replace(part, new), index
    return name.replace("o_proj.", "o.").replace("down_proj.", "down."), None


def _slot(name: str, param: torch.Tensor, cfg: ModelConfig, index: int | None) -> torch.Tensor:
    if index is None:
        return param
    if ".gate_up." in name:
        sizes = [cfg.intermediate_size] * 2
    else:
        sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    return param.split(sizes)[index]


def _parts(name: str) -> list[int | None]:
    """The pieces a parameter is copied from: fused ones from several checkpoint tensors."""
    if name.endswith((".qkv.weight", ".qkv.bias")):
        return [0, 1, 2]
    return [0, 1] if name.endswith(".gate_up.weight") else [None]


def _shards(folder: Path) -> list[Path]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise EngineError(f"{index}: malformed index: {e}") from None
        return [folder / f for f in sorted(set(weight_map.values()))]
    raise EngineError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_model(folder: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               max_positions: int) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(cfg, max_positions)
    params = dict(model.named_parameters())
    for name, p in params.items():
        module, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        real = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
        setattr(module, attr, real)
        params[name] = real
    missing = {(n, i) for n in params for i in _parts(n)}

    for shard in _shards(folder):
        if not shard.exists():
            raise EngineError(f"{shard}: missing shard")
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if IGNORED.match(key) or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                        continue
                    name, index = _target(cfg, key)
                    if name not in params:
                        raise EngineError(f"{shard}: unexpected tensor {key!r} (unsupported architecture?)")
                    slot = _slot(name, params[name], cfg, index)
                    tensor = f.get_tensor(key)
                    if tensor.shape != slot.shape:
                        raise EngineError(
                            f"{shard}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(slot.shape)}"
                        )
                    slot.copy_(tensor.to(device=device, dtype=dtype))
                    missing.discard((name, index))
        except SafetensorError as e:
            raise EngineError(f"{shard}: unreadable safetensors file: {e}") from None
    if missing:
        names = sorted(n if i is None else f"{n}[{i}]" for n, i in missing)
        raise EngineError(f"{folder}: checkpoint lacks tensors for {', '.join(names[:5])}")
    model.init_rope()
    return model.eval()


def load_layer_weights(folder: Path, cfg: ModelConfig, layer: int, device: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 16-bit weights of one decoder layer's linear layers, fresh from the memory-mapped checkpoint:
    {our parameter name: [out, in] tensor}, fused where the model fuses them. What the weight_bits
    knob quantizes from, a layer at a time, so no second 16-bit copy of the model is ever held."""
    prefix = f"model.layers.{layer}."
    sizes = {"qkv": (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, "o": cfg.hidden_size,
             "gate_up": 2 * cfg.intermediate_size, "down": cfg.hidden_size}
    inputs = {"qkv": cfg.hidden_size, "o": cfg.num_heads * cfg.head_dim, "gate_up": cfg.hidden_size,
              "down": cfg.intermediate_size}
    out: dict[str, torch.Tensor] = {}
    for shard in _shards(folder):
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not (key.startswith(prefix) and key.endswith(".weight") and "_proj." in key):
                    continue
                name, index = _target(cfg, key)
                kind = name.split(".")[-2]
                if name not in out:
                    out[name] = torch.empty(sizes[kind], inputs[kind], dtype=dtype, device=device)
                _slot(name, out[name], cfg, index).copy_(f.get_tensor(key).to(device=device, dtype=dtype))
    return out


def load_tensor(folder: Path, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One checkpoint tensor by its name, fresh from the memory-mapped file (e.g. "lm_head.weight")."""
    for shard in _shards(folder):
        with safe_open(shard, framework="pt", device="cpu") as f:
            if key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                return f.get_tensor(key).to(device=device, dtype=dtype)
    raise EngineError(f"{folder}: no tensor {key!r} in the checkpoint")
