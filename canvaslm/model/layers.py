"""Building blocks of DiffusionGemma: RMSNorm, rotary embeddings (default and proportional), attention, MLP.

Attention runs in two modes that share weights: `encode` (causal, writes the KV cache) and `decode`
(bidirectional over the canvas, reads the cache, writes nothing). Which keys a query may see is decided
from absolute positions, so one rule serves prompts, chunked prefill, committed canvases and training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import FULL, SLIDING, ModelConfig, RopeSpec


class RMSNorm(nn.Module):
    """Gemma-4 RMSNorm: computed in float32, optional learned scale (no `1 +` offset)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies for one layer type; proportional RoPE pads the unrotated part with zeros and
    divides by its `factor`."""
    if spec.rope_type == "proportional":
        n_rot = int(spec.partial_rotary_factor * head_dim // 2)
        exps = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim
        rotated = 1.0 / (spec.theta ** exps)
        return torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot)]) / spec.factor
    dim = int(head_dim * spec.partial_rotary_factor)
    return 1.0 / (spec.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class Rotary(nn.Module):
    """cos/sin tables per layer type, computed on the fly from positions (no max-length table)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.types = sorted(set(cfg.layer_types))
        for t in self.types:
            head_dim = cfg.head_dims[cfg.layer_types.index(t)]
            self.register_buffer(f"{t}_inv_freq", rope_inv_freq(cfg.rope[t], head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        out = {}
        for t in self.types:
            inv = getattr(self, f"{t}_inv_freq").float()
            freqs = positions.float()[..., None] * inv  # [B, T, D/2]
            emb = torch.cat([freqs, freqs], dim=-1)
            out[t] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttnContext:
    """Everything attention needs besides the hidden states, for one forward call.

    q_pos: [B, T] absolute positions of the new tokens (-1 = padding).
    old_pos: per layer type, [B, S] positions held by the cache rows (-1 = empty).
    canvas_start: [B] first canvas position (decode mode only): cached keys at or after it are hidden.
    """

    mode: str  # "encode" | "decode"
    q_pos: torch.Tensor
    slots: torch.Tensor | None
    cache: object | None  # KVCache
    old_pos: dict
    canvas_start: torch.Tensor | None = None
    write: bool = True
    upto: int | None = None  # full layers read only this many leading cache columns (KVCache.span)
    blocks: torch.Tensor | None = None  # [B, T] encode only: image run id per new token (-1 = text)


def attention_mask(ctx: AttnContext, layer_type: str, window: int) -> torch.Tensor:
    """Boolean [B, 1, T, S+T] mask over [cached keys | new keys]."""
    q = ctx.q_pos[:, :, None]  # [B, T, 1]
    old = ctx.old_pos[layer_type][:, None, :]  # [B, 1, S]
    new = ctx.q_pos[:, None, :]  # [B, 1, T]
    sliding = layer_type == SLIDING
    if ctx.mode == "encode":
        def visible(k):
            m = (k >= 0) & (k <= q)
            return m & (k > q - window) if sliding else m
        m_old, m_new = visible(old), visible(new)
        if ctx.blocks is not None:  # the soft tokens of one image see each other both ways
            b = ctx.blocks
            m_new = m_new | ((b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0))
        # a padding query sees itself, so no row is empty (an all-masked row would make NaNs)
        m_new = m_new | torch.eye(q.shape[1], dtype=torch.bool, device=q.device)
    else:
        start = ctx.canvas_start[:, None, None]
        m_old = (old >= 0) & (old < start)
        if sliding:
            m_old = m_old & (old > start - window)
        m_old = m_old.expand(-1, q.shape[1], -1)
        m_new = torch.ones(q.shape[0], q.shape[1], q.shape[1], dtype=torch.bool, device=q.device)
    return torch.cat([m_old, m_new], dim=-1)[:, None]


class Attention(nn.Module):
    """Grouped-query attention with q/k/v RMSNorm; full layers have no v_proj (values come from keys)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.layer = layer
        self.layer_type = cfg.layer_types[layer]
        self.head_dim, self.num_kv = cfg.head_dims[layer], cfg.num_kv_heads[layer]
        self.num_heads, self.window = h, cfg.sliding_window
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv * self.head_dim, bias=bias) if self.layer_type == SLIDING else None
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple, ctx: AttnContext, biases: nn.Module | None = None) -> torch.Tensor:
        """biases: other q/k/v/o_proj biases to use with this layer's weights (the encoder's own, under
        attention_bias: model.diffusion_gemma.EncoderAttentionBiases); None: the layer's."""
        B, T, _ = x.shape
        cos, sin = rope
        if biases is None:
            q, k_raw = self.q_proj(x), self.k_proj(x)
            v = self.v_proj(x) if self.v_proj is not None else None
        else:
            q, k_raw = _with_bias(self.q_proj, x, biases.q_proj), _with_bias(self.k_proj, x, biases.k_proj)
            v = _with_bias(self.v_proj, x, biases.v_proj) if self.v_proj is not None else None
        q = apply_rope(self.q_norm(q.view(B, T, -1, self.head_dim)), cos, sin)
        k_raw = k_raw.view(B, T, -1, self.head_dim)
        v = self.v_norm(v.view(B, T, -1, self.head_dim) if v is not None else k_raw)
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        cache = ctx.cache
        if ctx.old_pos[self.layer_type].shape[1]:  # cached rows to see (none: no cache, or a fresh encode)
            k_old, v_old = cache.read(self.layer, ctx.slots, ctx.upto)  # [B, Hk, S, D]
            k_all, v_all = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)
        else:
            k_all, v_all = k, v
        mask = attention_mask(ctx, self.layer_type, self.window)  # [B, 1, T, S + T]
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=1.0,
                                             enable_gqa=self.num_kv != self.num_heads)
        if ctx.mode == "encode" and cache is not None and ctx.write:
            cache.write(self.layer, ctx.slots, ctx.q_pos, k, v)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out) if biases is None else _with_bias(self.o_proj, out, biases.o_proj)


def _with_bias(proj: nn.Module, x: torch.Tensor, own: nn.Module) -> torch.Tensor:
    """proj(x) with `own.bias` in place of proj's bias. A plain linear is recomputed with it; a wrapped or
    quantised one (LoRA, FP8, int4) runs as is and has its bias swapped by adding the difference."""
    if type(proj) is nn.Linear:
        return F.linear(x, proj.weight, own.bias)
    base = proj
    while getattr(base, "bias", None) is None and hasattr(base, "base"):  # LoRA wrappers hold the projection
        base = base.base
    return proj(x) + (own.bias - base.bias).to(x.dtype)


class MLP(nn.Module):
    """Gated MLP (gate/up/down) with tanh-approximated GELU."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


__all__ = ["RMSNorm", "Rotary", "Attention", "AttnContext", "MLP", "apply_rope", "attention_mask", "FULL"]
