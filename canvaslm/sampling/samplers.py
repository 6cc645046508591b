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


def sampleable_vocab(model) -> int | None:
    """The ids a model's outputs may take, [0, n): `model.sampleable_vocab` (set by `set_sampleable_vocab` from
    the tokenizer), or None when every id of its vocabulary may be sampled."""
    n = getattr(model, "sampleable_vocab", None)
    return n if n is not None and n < model.cfg.vocab_size else None


def set_sampleable_vocab(model, tokenizer) -> None:
    """Outputs of `model` stay within `tokenizer`'s ids: a checkpoint whose embedding has padded rows past the
    tokenizer's vocabulary (as Gemma-style checkpoints do) never samples those ids, which decode to nothing.
    No tokenizer (token ids in and out), or one covering the whole vocabulary: every id may be sampled."""
    n = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    model.sampleable_vocab = n if n is not None and 0 < n < model.cfg.vocab_size else None


def ban_unsampleable(logits: torch.Tensor, sampleable: int | None) -> torch.Tensor:
    """logits [..., V] with the ids >= `sampleable` at -inf, in place (never the argmax or a sample); as they
    are when `sampleable` is None, so a model whose tokenizer covers its vocabulary samples bit for bit as before."""
    if sampleable is not None and sampleable < logits.shape[-1]:
        logits[..., sampleable:] = float("-inf")
    return logits


def categorical(probs: torch.Tensor, gens, active=None) -> torch.Tensor:
    """One sample per position from probs [B, C, V]."""
    B, C, V = probs.shape
    if not isinstance(gens, (list, tuple)):
        return torch.multinomial(probs.view(-1, V), 1, generator=gens).view(B, C)
    return _per_row(gens, active, C, lambda b, g: torch.multinomial(probs[b], 1, generator=g).view(1, C),
                    0, probs.device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Sample ids [N] from probs [N, V] (non-negative rows, zeros allowed) at uniforms u [N] in [0, 1): the first
    id whose cumulative probability passes u * the row's total. Two levels, so nothing vocabulary-sized is
    cumulated in float64: block sums of `block` ids pick the block, a float64 cumsum inside it the id; an id
    of probability 0 is never returned."""
    N, V = probs.shape
    nb, tail = divmod(V, block)
    sums = probs[:, :nb * block].reshape(N, nb, block).sum(-1).double()  # float32 pairwise sums, cumulated in f64
    if tail:
        sums = torch.cat([sums, probs[:, nb * block:].sum(-1, keepdim=True).double()], dim=1)
    cum = sums.cumsum(-1)  # [N, blocks]
    target = (u.double() * cum[:, -1])[:, None]  # [N, 1]
    j = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)  # the block
    rest = target - torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
    ids = j * block + torch.arange(block, device=probs.device)  # [N, block]
    inside = ids < V
    inner = torch.where(inside, probs.gather(1, ids.clamp(max=V - 1)).double(), 0.0)
    k = torch.searchsorted(inner.cumsum(-1), rest, right=True)
    last = block - 1 - (inner.flip(-1) > 0).to(torch.uint8).argmax(-1, keepdim=True)  # rounding past the end
    return (j * block + torch.minimum(k, last)).squeeze(1)


def categorical_cdf(probs: torch.Tensor, gens, active=None) -> torch.Tensor:
    """One sample per position from probs [B, C, V] by inverse CDF: one float64 uniform per position where
    `torch.multinomial` draws an exponential for every vocabulary entry (V per position; on a CPU that draw
    costs about a decoder step of a small model). The same distribution, other random numbers."""
    B, C, V = probs.shape
    dev = probs.device
    if not isinstance(gens, (list, tuple)):
        u = torch.rand(B * C, generator=gens, dtype=torch.float64, device=dev)
    else:
        keep = [True] * B if active is None else active.tolist()
        u = torch.cat([torch.rand(C, generator=g, dtype=torch.float64, device=dev) if keep[b]
                       else torch.zeros(C, dtype=torch.float64, device=dev) for b, g in enumerate(gens)])
    return inverse_cdf(probs.reshape(B * C, V), u).view(B, C)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, [B, C, V] -> [B, C] (float32)."""
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(norm, dim=-1)
    return -(norm.clamp(min=torch.finfo(norm.dtype).min) * p).sum(-1)


def probs_and_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(logits) in float32 [B, C, V], its entropy [B, C]) in one set of passes over the vocabulary:
    `token_entropy`'s formula, the probabilities it needs reused for the draw instead of a second softmax
    (equal to the reference's to float32 rounding)."""
    x = logits.float()
    norm = x - x.logsumexp(dim=-1, keepdim=True)
    del x
    probs = norm.exp()
    norm.clamp_(min=torch.finfo(norm.dtype).min).mul_(probs)  # -inf (a banned id) x probability 0 -> 0
    return probs, -norm.sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Accept the k lowest-entropy positions with sum - max <= bound. entropy [B, C], bound [B] -> bool [B, C]."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    chosen = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound[:, None]
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


# how a step draws its samples (entropy_bound_step's impl); "auto": fused on CUDA, cdf elsewhere
SAMPLER_IMPLS = ("auto", "reference", "cdf", "fused")


def checked_impl(impl, name: str, error: type = ValueError) -> str:
    """`impl` when it is one of SAMPLER_IMPLS, else `error` naming the setting (`name`) that gave it."""
    if impl not in SAMPLER_IMPLS:
        raise error(f"{name} {impl!r}: expected one of {SAMPLER_IMPLS}")
    return impl


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
    that are always accepted and never renoised. impl (SAMPLER_IMPLS): "reference" (this code, drawing with
    `torch.multinomial` as the reference does: the same tokens as `transformers` for the same generator),
    "cdf" (this code, drawing by inverse CDF: `categorical_cdf`), "fused" (`sampling.fused`: streamed over
    the vocabulary, Gumbel-max sampling) or "auto" (fused on CUDA, cdf elsewhere).
    """
    checked_impl(impl, "sampler impl")
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
    active = ~st.finished if isinstance(gens, (list, tuple)) else None
    if impl == "reference":  # the reference's own passes, so its entropies (and acceptance) are bit for bit
        probs = torch.softmax(proc, dim=-1, dtype=torch.float32)
        sample = categorical(probs, gens, active)
        del probs
        entropy = token_entropy(proc)
    else:
        probs, entropy = probs_and_entropy(proc)
        sample = categorical_cdf(probs, gens, active)
        del probs
    argmax = proc.argmax(dim=-1)
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
