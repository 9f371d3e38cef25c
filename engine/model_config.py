"""config.json of a Llama-family checkpoint, validated: what we cannot compute exactly is rejected."""

import json
from dataclasses import dataclass
from pathlib import Path

from optd.engine.config import EngineError

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str | None

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise EngineError(f"{path}: missing (not a Hugging Face checkpoint folder?)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise EngineError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise EngineError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except EngineError as e:
            raise EngineError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED:
            raise EngineError(
                f"model_type={model_type!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})"
            )
        _reject_unsupported(raw, model_type)

        def need(key: str, kind: type = int):
            if key not in raw:
                raise EngineError(f"field {key!r} is missing")
            value = raw[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise EngineError(f"field {key!r} must be {kind.__name__}, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise EngineError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "mistral") and attention_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=_sliding_window(raw, model_type),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )


def _bad(field: str, value) -> ModelConfig:
    raise EngineError(f"field {field!r} has an unsupported value {value!r}")


def _reject_unsupported(raw: dict, model_type: str) -> None:
    """Fields that change the math in ways this engine does not implement."""
    act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if act != "silu":
        _bad("hidden_act", act)
    if raw.get("mlp_bias"):
        _bad("mlp_bias", raw["mlp_bias"])
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        _bad("partial_rotary_factor", raw["partial_rotary_factor"])
    if raw.get("quantization_config"):
        raise EngineError("field 'quantization_config': pre-quantized checkpoints are not supported")
    # Sliding layers are honoured only through _sliding_window (all layers alike); a mix is rejected.
    layer_types = set(raw.get("layer_types") or [])
    if not layer_types <= {"full_attention", "sliding_attention"} or len(layer_types) > 1:
        _bad("layer_types", sorted(layer_types))


def _sliding_window(raw: dict, model_type: str) -> int | None:
    if model_type == "mistral":
        return raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        return raw.get("sliding_window")
    return None


def _rope(raw: dict) -> RopeConfig:
    # transformers < 5 writes rope_theta + rope_scaling; >= 5 writes rope_parameters.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    field = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "llama3":
        try:
            return RopeConfig(
                theta=theta,
                kind="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise EngineError(f"field {field!r}: llama3 rope scaling needs {e.args[0]!r}") from None
    return _bad(f"{field}.rope_type", kind)
