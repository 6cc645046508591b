"""The DiffusionGemma network: one weight set, two modes.

`encode(tokens, positions, slots, cache)` runs causally and writes the KV cache (prompt, chunks of a
prompt, committed canvases). `denoise(canvas, slots, cache, sc_logits)` runs bidirectionally over a
canvas, reads the cache and writes nothing. Parameter names follow the HF checkpoint
(`model.decoder.layers.N...`), so weights load without renaming; encoder and decoder share the layers,
except for what the encoder holds of its own (`model.encoder.language_model.layers.N`): a per-layer
scalar and, with `attention_bias`, the q/k/v/o projection biases.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .layers import MLP, Attention, AttnContext, RMSNorm, Rotary
from .moe import Experts, Router


class Layer(nn.Module):
    """Attention, then a dense MLP and the MoE side by side, each wrapped in RMSNorms."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(d, cfg.intermediate_size)
        self.router = Router(d, cfg.num_experts, cfg.top_k_experts, eps)
        self.experts = Experts(d, cfg.moe_intermediate_size, cfg.num_experts)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(d, eps))
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h: torch.Tensor, rope: tuple, ctx: AttnContext, scalar: torch.Tensor,
                biases: nn.Module | None = None) -> torch.Tensor:
        """biases: the encoder's own attention biases (EncoderAttentionBiases), used instead of the layer's."""
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, ctx, biases))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, h.shape[-1])  # the router sees the residual stream, not the normed input
        weights, ids = self.router(flat)
        sparse = self.experts(self.pre_feedforward_layernorm_2(flat), weights, ids)
        sparse = self.post_feedforward_layernorm_2(sparse.reshape(h.shape))
        return (h + self.post_feedforward_layernorm(dense + sparse)) * scalar


class SelfConditioning(MLP):
    """Soft embeddings of the previous step -> gated MLP, added to the canvas embeddings, then normed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.intermediate_size)
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is None:  # first step: a zero signal maps to exactly zero (no biases), skip the MLP
            return self.post_norm(embeds)
        return self.post_norm(embeds + super().forward(self.pre_norm(soft)))


class TextModel(nn.Module):
    """Embeddings, layers and final norm (HF: `model.decoder`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)


class _Bias(nn.Module):
    """A projection's bias without its weight (the weight is the decoder's)."""

    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))


class EncoderAttentionBiases(nn.Module):
    """The encoder's own q/k/v/o_proj biases of one layer (attention_bias): transformers ties the encoder's
    projection weights to the decoder's, not their biases, so a trained checkpoint holds two sets."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        heads, hd, kv = cfg.num_attention_heads, cfg.head_dims[layer], cfg.num_kv_heads[layer]
        self.q_proj, self.k_proj, self.o_proj = _Bias(heads * hd), _Bias(kv * hd), _Bias(cfg.hidden_size)
        self.v_proj = _Bias(kv * hd) if cfg.is_sliding(layer) else None  # full layers have no v_proj


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.register_buffer("layer_scalar", torch.ones(1))
        if cfg.attention_bias:
            self.self_attn = EncoderAttentionBiases(cfg, layer)


class EncoderScalars(nn.Module):
    """What the encoder holds of its own (HF: `model.encoder.language_model.layers.N`): the per-layer
    scalars, and with attention_bias the attention biases; every other encoder weight is the decoder's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList(_EncoderLayer(cfg, i) for i in range(cfg.num_layers))


class _Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.decoder = TextModel(cfg)
        self.encoder = EncoderScalars(cfg)


class DiffusionGemma(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Model(cfg)
        self.rotary = Rotary(cfg)
        self.lora_serving = None  # lora_serving.MultiLoRA once served adapters are installed
        # training: each layer's activations are recomputed in the backward instead of kept (less memory)
        self.gradient_checkpointing = False

    # --- small helpers -------------------------------------------------------------------------
    @property
    def text(self) -> TextModel:
        return self.model.decoder

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.text.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_weight
        return F.embedding(ids, w) * torch.tensor(self.cfg.hidden_size ** 0.5).to(w.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head + softcap, in float32: [.., d] -> [.., V]."""
        out = F.linear(hidden, self.embed_weight).float()
        cap = self.cfg.final_logit_softcapping
        return torch.tanh(out / cap) * cap if cap else out

    def soft_embeddings(self, sc_logits: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
        """softmax(logits) @ E * sqrt(d), a chunk of rows at a time so no fp32 [B, C, V] copy is made.
        On CUDA: an online softmax over vocabulary chunks (kernels.soft_embed), O(rows * chunk) memory."""
        w = self.embed_weight
        if sc_logits.is_cuda:
            from ..kernels.soft_embed import soft_embeddings_online

            return soft_embeddings_online(sc_logits, w, self.cfg.hidden_size ** 0.5)
        flat = sc_logits.reshape(-1, sc_logits.shape[-1])
        out = torch.empty(flat.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        for i in range(0, flat.shape[0], rows_per_chunk):
            p = torch.softmax(flat[i:i + rows_per_chunk], dim=-1, dtype=torch.float32).to(w.dtype)
            out[i:i + rows_per_chunk] = p @ w
        scale = torch.tensor(self.cfg.hidden_size ** 0.5).to(w.dtype)
        return (out * scale).view(*sc_logits.shape[:-1], -1)

    def _run_layers(self, h, positions, ctx, scalars, biases=None) -> torch.Tensor:
        rope = self.rotary(positions, h.dtype)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.text.layers):
            args = (h, rope[self.cfg.layer_types[i]], ctx, scalars[i]) + ((biases[i],) if biases else ())
            h = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return self.text.norm(h)

    # --- the two modes -------------------------------------------------------------------------
    @staticmethod
    def image_blocks(image_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] id of the image each token belongs to (-1 = text): a run of consecutive image tokens is
        one image, whose soft tokens see each other both ways in the encoder when the config says
        `use_bidirectional_attention: vision` (so an image must be encoded in one call)."""
        starts = image_mask.clone()
        starts[:, 1:] &= ~image_mask[:, :-1]
        return torch.where(image_mask, starts.long().cumsum(1), -1)

    def embed_prompt(self, tokens: torch.Tensor, image_embeds: torch.Tensor | None = None,
                     image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the positions of `image_mask` [B, T] replaced, in row-major order, by the
        rows of `image_embeds` [n, d] (the vision tower's soft tokens, not scaled by sqrt(d))."""
        h = self.embed(tokens)
        if image_embeds is None:
            return h
        return h.masked_scatter(image_mask[..., None], image_embeds.to(h.dtype))

    def encode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache,
               write: bool = True, fresh: bool = False, max_position: int | None = None,
               image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over new tokens [B, T] at absolute positions [B, T] (-1 = padding); writes
        their K/V into the cache slots and returns final-normed hidden states [B, T, d].
        fresh: the slots start over (what they held is forgotten) and attention skips their empty
        cache rows instead of reading and masking them (a first prefill, every training step).
        max_position: positions.max() when the caller knows it on the host (saves a device sync, and
        full layers then read only the cache columns below it: KVCache.span).
        image_embeds, image_mask: [n, d] soft tokens for the n True positions of the bool [B, T] mask (image
        placeholders of the prompt; the caller checks the count and keeps each image inside one call)."""
        if (image_embeds is None) != (image_mask is None):
            raise ValueError("encode: image_embeds and image_mask go together")
        upto = None
        if cache is not None:
            cache.check_fits(positions, max_position)
            if fresh:
                cache.reset(slots)
            upto = cache.span(None if max_position is None else max_position + 1)
        if cache is not None and not fresh:
            old = cache.old_positions(slots, upto)
        else:  # nothing cached to attend to
            old = {t: positions.new_full((positions.shape[0], 0), -1) for t in set(self.cfg.layer_types)}
        if self.lora_serving is not None:
            self.lora_serving.select(slots, "encode")
        blocks = self.image_blocks(image_mask) if image_mask is not None and self.cfg.bidirectional_vision else None
        ctx = AttnContext("encode", positions, slots, cache, old, write=write, upto=upto, blocks=blocks)
        own = self.model.encoder.language_model.layers
        scalars = [m.layer_scalar for m in own]
        biases = [m.self_attn for m in own] if self.cfg.attention_bias else None
        h = self._run_layers(self.embed_prompt(tokens, image_embeds, image_mask), positions, ctx, scalars, biases)
        if cache is not None and write:
            cache.commit_positions(slots, positions)
        return h

    def denoise(self, canvas: torch.Tensor, slots: torch.Tensor, cache, sc_logits: torch.Tensor | None = None,
                sc_embeds: torch.Tensor | None = None, sc_mask: torch.Tensor | None = None,
                canvas_start: torch.Tensor | None = None, return_hidden: bool = False,
                max_start: int | None = None) -> torch.Tensor:
        """Bidirectional pass over a canvas [B, C] that starts at `canvas_start` [B] (default: each slot's
        cache length). Self-conditioning from the previous step's logits (or precomputed soft
        embeddings); sc_mask [B] zeroes it per row. max_start: a host bound on canvas_start (full layers
        then read only the cache columns below it: KVCache.span). Returns float32 logits [B, C, V]."""
        B, C = canvas.shape
        if canvas_start is None:
            canvas_start = cache.lengths.index_select(0, slots)
        positions = canvas_start[:, None] + torch.arange(C, device=canvas.device)
        if self.lora_serving is not None:
            self.lora_serving.select(slots, "decode")
        if sc_embeds is None and sc_logits is not None:
            sc_embeds = self.soft_embeddings(sc_logits)
        if sc_embeds is not None and sc_mask is not None:
            sc_embeds = sc_embeds * sc_mask.to(sc_embeds.dtype)[:, None, None]
        h = self.text.self_conditioning(self.embed(canvas), sc_embeds)
        upto = cache.span(max_start)
        ctx = AttnContext("decode", positions, slots, cache, cache.old_positions(slots, upto), canvas_start, upto=upto)
        h = self._run_layers(h, positions, ctx, [layer.layer_scalar for layer in self.text.layers])
        return h if return_hidden else self.logits(h)

    def set_moe_impl(self, impl: str):
        for layer in self.text.layers:
            layer.experts.impl = impl
