"""The fused entropy-bound sampling step: same algorithm as `samplers.entropy_bound_step`, no
vocabulary-sized float32 temporaries.

One streaming pass over the vocabulary (`kernels.vocab_stats`, Triton on GPU) yields per position the
entropy, the argmax and a categorical sample (Gumbel-max with counter-based Philox noise keyed by a
per-row seed: reproducible per request, independent of batching and of the chunk size). Acceptance,
renoising and the stop check then work on [B, C] tensors only. Two entry points:

- `fused_entropy_bound_step(logits, ...)`: from the decoder's [B, C, V] logits; optionally writes the
  processed logits (the next step's `sc_logits`) in a dtype of your choice, in the same pass.
- `fused_step_from_hidden(hidden, model, ...)`: from final hidden states [B, C, d]; the LM head runs a
  vocabulary chunk at a time and self-conditioning's soft embeddings are accumulated on the way
  (returned as `sc_embeds`), so nothing of size [B, C, V] is ever allocated.

Randomness differs from the reference sampler (torch.multinomial vs Gumbel-max), so outputs match it in
distribution, not token for token; entropies and argmaxes match to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import philox as ph
from ..kernels.soft_embed import SoftEmbedAccumulator
from ..kernels.vocab_stats import VocabStats, stats_over_vocab, update
from .samplers import CanvasState, SamplerParams, entropy_bound_accept
from .schedules import linear_temperature
from .stopping import stable_and_confident
from .truncation import keep_mask


def _per_position(st: CanvasState, p: SamplerParams, seeds: torch.Tensor):
    """temperature, seed and canvas position of each of the N = B * C positions, all [N]."""
    B, C = st.canvas.shape
    temp = linear_temperature(st.cur_step, p.n_steps, p.t_min, p.t_span)  # [B]
    pos = torch.arange(C, device=st.canvas.device).repeat(B)
    return temp.repeat_interleave(C), seeds.repeat_interleave(C), pos


def _finish(stats: VocabStats, st: CanvasState, p: SamplerParams, seeds, vocab, pinned, sc_logits=None,
            sc_embeds=None) -> CanvasState:
    """Acceptance, renoising, frozen finished rows and the stop check, on [B, C] tensors."""
    B, C = st.canvas.shape
    entropy = stats.entropy().view(B, C)
    argmax, sample = stats.best_id.view(B, C), stats.gbest_id.view(B, C)
    accept = entropy_bound_accept(entropy, p.entropy_bound)
    if pinned is not None:
        is_pin = pinned >= 0
        accept, sample = accept | is_pin, torch.where(is_pin, pinned, sample)
        argmax = torch.where(is_pin, pinned, argmax)
    cols = torch.arange(C, device=seeds.device)
    noise = ph.philox(seeds[:, None], cols[None, :], 0, ph.STREAM_NOISE, 0) % vocab  # [B, C]
    canvas = torch.where(accept, sample, noise)
    done = st.finished
    argmax = torch.where(done[:, None], st.argmax, argmax)
    canvas = torch.where(done[:, None], st.canvas, canvas)
    if sc_embeds is not None and st.sc_embeds is not None:
        sc_embeds = torch.where(done[:, None, None], st.sc_embeds, sc_embeds)
    stop, history = stable_and_confident(st.history, argmax, entropy, p.stability, p.confidence)
    finished = done | stop | (st.cur_step <= 1)
    return CanvasState(canvas, argmax, sc_logits, finished, history, st.cur_step - 1, sc_embeds=sc_embeds)


def seeds_for(gens_or_seeds, batch: int, device, finished: torch.Tensor | None = None) -> torch.Tensor:
    """A [B] int64 seed tensor as given, or one drawn per row from the generator(s) (per-row generators of
    finished rows do not move, as in the reference sampler)."""
    if isinstance(gens_or_seeds, torch.Tensor):
        return gens_or_seeds.to(device=device, dtype=torch.long)
    active = ~finished if finished is not None and isinstance(gens_or_seeds, (list, tuple)) else None
    return ph.draw_seeds(gens_or_seeds, batch, device, active)


def fused_entropy_bound_step(logits: torch.Tensor, st: CanvasState, p: SamplerParams, gens, vocab: int,
                             logit_mask: torch.Tensor | None = None, pinned: torch.Tensor | None = None,
                             sc_dtype: torch.dtype | None = None, write_sc: bool = True, chunk: int = 8192,
                             impl: str = "auto") -> CanvasState:
    """One entropy-bound step from logits [B, C, V]. gens: generator(s) or a [B] int64 seed tensor.
    sc_logits of the result: the processed logits (logits / temperature, masked) in sc_dtype (default:
    the logits' dtype), written in the same pass; None with write_sc=False. Finished rows keep their
    canvas and argmax; their sc_logits are not preserved (nothing reads them)."""
    B, C, V = logits.shape
    seeds = seeds_for(gens, B, logits.device, st.finished)
    temp, seeds_n, pos = _per_position(st, p, seeds)
    if p.truncation is not None:
        logit_mask = keep_mask(logits, temp[::C], p.truncation, logit_mask)
    proc = torch.empty(B, C, V, dtype=sc_dtype or logits.dtype, device=logits.device) if write_sc else None
    stats = stats_over_vocab(logits.reshape(B * C, V), temp, seeds_n, pos,
                             None if logit_mask is None else logit_mask.reshape(B * C, V),
                             None if proc is None else proc.view(B * C, V), chunk=chunk, impl=impl)
    return _finish(stats, st, p, seeds, vocab, pinned, sc_logits=proc)


def fused_step_from_hidden(hidden: torch.Tensor, model, st: CanvasState, p: SamplerParams, gens, vocab: int,
                           logit_mask: torch.Tensor | None = None, pinned: torch.Tensor | None = None,
                           chunk: int = 16384, impl: str = "auto") -> CanvasState:
    """One entropy-bound step from the decoder's final hidden states [B, C, d] (`denoise(...,
    return_hidden=True)`): LM head, softcap, sampling statistics and self-conditioning's soft embeddings,
    a vocabulary chunk at a time. The result carries sc_embeds [B, C, d] (feed `denoise(sc_embeds=...)`)
    and no sc_logits."""
    B, C, d = hidden.shape
    N = B * C
    if p.truncation is not None:
        raise ValueError("fused_step_from_hidden does not cut (top_k / top_p / min_p); use the logits step")
    weight = model.embed_weight  # [V, d], the tied LM head
    cap = model.cfg.final_logit_softcapping
    seeds = seeds_for(gens, B, hidden.device, st.finished)
    temp, seeds_n, pos = _per_position(st, p, seeds)
    flat = hidden.reshape(N, d)
    stats = VocabStats.new(N, hidden.device)
    soft = SoftEmbedAccumulator(N, d, hidden.device)
    mask = None if logit_mask is None else logit_mask.reshape(N, -1)
    for v0 in range(0, vocab, chunk):
        v1 = min(v0 + chunk, vocab)
        logits = F.linear(flat, weight[v0:v1]).float()  # [N, chunk]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        m_chunk = None if mask is None else mask[:, v0:v1]
        update(stats, logits, v0, temp, seeds_n, pos, m_chunk, impl=impl)
        s = logits / temp[:, None]
        if m_chunk is not None:
            s = s.masked_fill(~m_chunk, float("-inf"))
        soft.add(s, weight[v0:v1])
    sc_embeds = soft.result(model.cfg.hidden_size ** 0.5, weight.dtype).view(B, C, d)
    return _finish(stats, st, p, seeds, vocab, pinned, sc_embeds=sc_embeds)
