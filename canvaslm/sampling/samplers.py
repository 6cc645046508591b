"""Samplers: turn a denoiser's logits into the next canvas. Tensors in, tensors out, no host sync.

The entropy-bound sampler (the reference) samples every position, accepts the lowest-entropy positions
while sum(entropy) - max(entropy) <= bound (an upper bound on their joint mutual information, so they
are nearly independent), and renoises the rest with uniform random tokens. Randomness comes from
explicit generators: one shared by the batch (the reference's behaviour) or one per request (a request's
output then does not depend on what it was batched with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedules import linear_temperature
from .stopping import stable_and_confident
from .truncation import Truncation, keep_mask


def _per_row(gens, active, length, draw, fill, device):
    """Row b drawn from gens[b]; rows that are not active draw nothing (their generator does not move),
    so a request's random stream does not depend on what it is batched with."""
    keep = [True] * len(gens) if active is None else active.tolist()
    rows = [draw(b, g) if keep[b] else torch.full((1, length), fill, dtype=torch.long, device=device)
            for b, g in enumerate(gens)]
    return torch.cat(rows)


def randint(vocab: int, batch: int, length: int, gens, device, active=None) -> torch.Tensor:
    """Uniform random tokens [B, L]; gens is one generator or a list with one per row."""
    if not isinstance(gens, (list, tuple)):
        return torch.randint(0, vocab, (batch, length), generator=gens, device=device)
    return _per_row(gens, active, length,
                    lambda b, g: torch.randint(0, vocab, (1, length), generator=g, device=device), 0, device)


def categorical(probs: torch.Tensor, gens, active=None) -> torch.Tensor:
    """One sample per position from probs [B, C, V]."""
    B, C, V = probs.shape
    if not isinstance(gens, (list, tuple)):
        return torch.multinomial(probs.view(-1, V), 1, generator=gens).view(B, C)
    return _per_row(gens, active, C, lambda b, g: torch.multinomial(probs[b], 1, generator=g).view(1, C),
                    0, probs.device)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, [B, C, V] -> [B, C] (float32)."""
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(norm, dim=-1)
    return -(norm.clamp(min=torch.finfo(norm.dtype).min) * p).sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Accept the k lowest-entropy positions with sum - max <= bound. entropy [B, C], bound [B] -> bool [B, C]."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    chosen = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound[:, None]
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


@dataclass
class SamplerParams:
    """Per-row sampler settings as tensors [B] (built once per batch)."""

    n_steps: torch.Tensor  # int
    t_min: torch.Tensor  # float32
    t_span: torch.Tensor  # float32, t_max - t_min
    entropy_bound: torch.Tensor  # float32
    stability: torch.Tensor  # int
    confidence: torch.Tensor  # float32
    truncation: Truncation | None = None  # top-k / top-p / min-p cuts; None: no row cuts

    @classmethod
    def build(cls, rows: list, device) -> "SamplerParams":
        """rows: DiffusionParams (max_denoising_steps, t_min, t_max, entropy_bound, stability_threshold,
        confidence_threshold, top_k, top_p, min_p)."""
        def t(vals, dtype):
            return torch.tensor(vals, dtype=dtype, device=device)
        return cls(t([r.max_denoising_steps for r in rows], torch.int32),
                   t([r.t_min for r in rows], torch.float32),
                   t([r.t_max - r.t_min for r in rows], torch.float32),
                   t([r.entropy_bound for r in rows], torch.float32),
                   t([r.stability_threshold for r in rows], torch.long),
                   t([r.confidence_threshold for r in rows], torch.float32),
                   Truncation.build(rows, device))


@dataclass
class CanvasState:
    """Denoising state of a batch of canvases."""

    canvas: torch.Tensor  # [B, C] current (noisy) canvas
    argmax: torch.Tensor  # [B, C] latest argmax prediction (the draft, and what is committed)
    sc_logits: torch.Tensor | None  # [B, C, V] processed logits of the previous step
    finished: torch.Tensor  # [B] bool, stopped denoising
    history: torch.Tensor  # [B, depth, C] argmax history for the stability check
    cur_step: torch.Tensor  # [B] int, remaining steps (N..1)
    sc_embeds: torch.Tensor | None = None  # [B, C, d] soft embeddings (fused_step_from_hidden instead of sc_logits)


def entropy_bound_step(logits: torch.Tensor, st: CanvasState, p: SamplerParams, gens, vocab: int,
                       logit_mask: torch.Tensor | None = None, pinned: torch.Tensor | None = None,
                       impl: str = "auto") -> CanvasState:
    """One denoising step of the reference sampler.

    logit_mask: optional bool [B, C, V] of allowed tokens; pinned: optional [B, C] token ids (-1 = free)
    that are always accepted and never renoised. impl: "reference" (this code), "fused"
    (`sampling.fused`: streamed over the vocabulary, Gumbel-max sampling) or "auto" (fused on CUDA).
    """
    if impl == "fused" or (impl == "auto" and logits.is_cuda):
        from .fused import fused_entropy_bound_step

        return fused_entropy_bound_step(logits, st, p, gens, vocab, logit_mask=logit_mask, pinned=pinned)
    B, C, _ = logits.shape
    temp = linear_temperature(st.cur_step, p.n_steps, p.t_min, p.t_span)
    if p.truncation is not None:
        logit_mask = keep_mask(logits, temp, p.truncation, logit_mask)
    proc = logits / temp[:, None, None]  # [B, C, V]
    if logit_mask is not None:
        proc = proc.masked_fill(~logit_mask, float("-inf"))
    probs = torch.softmax(proc, dim=-1, dtype=torch.float32)
    active = ~st.finished if isinstance(gens, (list, tuple)) else None
    sample = categorical(probs, gens, active)
    del probs
    argmax = proc.argmax(dim=-1)
    entropy = token_entropy(proc)
    accept = entropy_bound_accept(entropy, p.entropy_bound)
    if pinned is not None:
        is_pin = pinned >= 0
        accept, sample = accept | is_pin, torch.where(is_pin, pinned, sample)
        argmax = torch.where(is_pin, pinned, argmax)
    accepted = torch.where(accept, sample, st.canvas)
    noise = randint(vocab, B, C, gens, logits.device, active)
    canvas = torch.where(accept, accepted, noise)
    done = st.finished
    # rows that already stopped keep their state (the batch still draws their randomness)
    argmax = torch.where(done[:, None], st.argmax, argmax)
    canvas = torch.where(done[:, None], st.canvas, canvas)
    if st.sc_logits is not None:
        proc = torch.where(done[:, None, None], st.sc_logits.to(proc.dtype), proc)
    stop, history = stable_and_confident(st.history, argmax, entropy, p.stability, p.confidence)
    finished = done | stop | (st.cur_step <= 1)
    return CanvasState(canvas, argmax, proc, finished, history, st.cur_step - 1)
