"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

At batch 1 decode every weight is read once per token, and each kernel launch costs about as much as
reading a few megabytes, so a layer is ten kernels: q/k/v and gate/up are one matmul each, the
residual add is fused into the RMSNorm after it, RoPE into the K/V cache write, SiLU into the product.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optd.engine.kv_cache import KVPool
from optd.engine.kv_compress import PrefillPacker
from optd.engine.linear import Linear
from optd.engine.model_config import ModelConfig, RopeConfig
from optd.kernels.packed_attention import packed_paged_attention
from optd.kernels.paged_attention import paged_attention
from optd.kernels.quant_linear import Int8Weight, quant_linear
from optd.kernels.rmsnorm import rms_norm
from optd.kernels.rope import rope_and_cache


@dataclass
class ForwardBatch:
    """Where each token of a forward sits, and how it attends.

    Prefill: whole sequences from position 0, concatenated; `prefill_lens` gives their lengths.
    Decode: one row per token, each attending to its own block table: its first `packed_pages` pages
    (quantized, every token visible), then `context_lens` tokens of its native tail (see kv_cache).
    """

    positions: Tensor                   # [T] int64
    slot_mapping: Tensor                # [T] int64: block * block_size + offset to write K/V
    prefill_lens: list[int] | None = None
    block_tables: Tensor | None = None  # [T, max_blocks] int32
    context_lens: Tensor | None = None  # [T] int32: tokens visible in the native tail
    packed_pages: Tensor | None = None  # [T] int32
    logits_rows: Tensor | None = None   # rows to compute logits for (None: all)
    packer: PrefillPacker | None = None  # prefill under kv_compression: writes prompts' packed pages


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); with a residual: residual += x in place, then (norm(residual), residual)."""
        return rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> Tensor:
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if rope.kind != "llama3":
        return inv_freq
    # Llama 3.1: leave high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], batch: ForwardBatch, pool: KVPool) -> Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = pool.layer(self.layer)
        # Rotates q and k in place and writes k, v into their cache slots.
        rope_and_cache(q, k, v, batch.positions, *rope, k_cache, v_cache, batch.slot_mapping)
        if batch.prefill_lens is not None:
            out = self._prefill(q, k, v, batch.prefill_lens, batch.packer)
        elif pool.packed_mode:
            out = packed_paged_attention(
                q, pool.layer_data(self.layer), pool.page_meta, batch.block_tables, batch.packed_pages,
                batch.context_lens, self.scale, block_size=pool.layout.block_size,
                num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        else:
            out = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, self.scale)
        return self.o(out.reshape(T, self.q_size))

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, lens: list[int],
                 packer: PrefillPacker | None) -> Tensor:
        group = self.num_heads // self.num_kv_heads
        outs = []
        for i, (qs, ks, vs) in enumerate(zip(q.split(lens), k.split(lens), v.split(lens), strict=True)):
            # [heads, len, dim] for SDPA; K/V heads repeated to the query heads (GQA).
            kr, vr = (t.transpose(0, 1).repeat_interleave(group, dim=0) for t in (ks, vs))
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), kr, vr, is_causal=True, scale=self.scale)
            outs.append(o.transpose(0, 1))
            if packer is not None:
                packer.write(self.layer, i, ks, vs,
                             lambda qs=qs, kr=kr: snapkv_scores(qs.transpose(0, 1), kr, self.scale, group))
        return torch.cat(outs)


def snapkv_scores(q: Tensor, k: Tensor, scale: float, group: int, window: int = 32, pool: int = 7) -> Tensor:
    """Importance of each prompt token per kv head [kv_heads, len]: the attention it gets from the last
    `window` queries (SnapKV's observation window), summed over them and the group's heads, then
    max-pooled over neighbours so that a kept token keeps its context. q, k: [heads, len, dim]."""
    n = q.shape[1]
    w = min(window, n)
    logits = (q[:, -w:].float() @ k.float().transpose(1, 2)) * scale  # [heads, w, len]
    causal = torch.arange(n, device=q.device)[None, :] > torch.arange(n - w, n, device=q.device)[:, None]
    probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
    per_head = probs.sum(1).view(-1, group, n).sum(1)  # [kv_heads, len]
    return F.max_pool1d(per_head[:, None], pool, stride=1, padding=pool // 2)[:, 0]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down.forward_swiglu(self.gate_up(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, residual: Tensor | None, rope: tuple[Tensor, Tensor], batch: ForwardBatch,
                pool: KVPool) -> tuple[Tensor, Tensor]:
        """x: the previous layer's output, not yet added to the residual stream (None at layer 0)."""
        if residual is None:
            x, residual = self.input_norm(x), x
        else:
            x, residual = self.input_norm(x, residual)
        x = self.attn(x, rope, batch, pool)
        x, residual = self.post_attn_norm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        tied = cfg.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_quant: Int8Weight | None = None  # the lm_head held in int8 (weight_bits <= 8)
        self.max_positions = max_positions
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_rope(self) -> None:
        """Tables of cos/sin per position, computed in float32 like Hugging Face, then cast."""
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        self.rope_cos = emb.cos().to(device=device, dtype=dtype)
        self.rope_sin = emb.sin().to(device=device, dtype=dtype)

    def forward(self, input_ids: Tensor, batch: ForwardBatch, pool: KVPool) -> Tensor:
        x, residual = self.embed(input_ids), None
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            x, residual = layer(x, residual, rope, batch, pool)
        if batch.logits_rows is not None:
            x, residual = x[batch.logits_rows], residual[batch.logits_rows]
        h, _ = self.norm(x, residual)
        if self.head_quant is not None:
            return quant_linear(h, self.head_quant).float()
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight).float()
