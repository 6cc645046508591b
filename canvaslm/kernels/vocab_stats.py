"""Streaming per-position statistics over the vocabulary: the heart of the fused sampling step.

For each position n (N = batch * canvas) and temperature-scaled logits s = logits / temp, one pass over
vocabulary chunks keeps, online (flash-softmax style):
  max m, sum_exp l = sum exp(s - m), ent t = sum exp(s - m) * (s - m)   -> entropy = log l - t / l
  argmax of s, and a categorical sample = argmax(s + Gumbel(seed, n's position, vocab id)).
So the full [N, V] softmax / probabilities / float32 copies never exist: memory is O(N * chunk).

`update_reference` (PyTorch) and `update_triton` do the same update on one chunk and agree to fp32
rounding (samples exactly, the Gumbel noise being the same Philox numbers). Masked entries (logit_mask
False) are -inf: zero probability, never the argmax or the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import philox as ph
from . import use_triton


@dataclass
class VocabStats:
    """Running statistics per position, all [N]."""

    m: torch.Tensor  # float32 running max of s
    l: torch.Tensor  # float32 sum exp(s - m)
    t: torch.Tensor  # float32 sum exp(s - m) * (s - m)
    best: torch.Tensor  # float32 max of s seen (argmax value)
    best_id: torch.Tensor  # int64
    gbest: torch.Tensor  # float32 max of s + gumbel
    gbest_id: torch.Tensor  # int64

    @classmethod
    def new(cls, n: int, device) -> "VocabStats":
        neg = torch.full((n,), float("-inf"), device=device)
        zero = torch.zeros(n, device=device)
        ids = torch.zeros(n, dtype=torch.long, device=device)
        return cls(neg.clone(), zero.clone(), zero, neg.clone(), ids.clone(), neg, ids)

    def reset_(self):
        for x in (self.m, self.best, self.gbest):
            x.fill_(float("-inf"))
        for x in (self.l, self.t, self.best_id, self.gbest_id):
            x.zero_()

    def entropy(self) -> torch.Tensor:
        return torch.log(self.l) - self.t / self.l

    def log_normalizer(self) -> torch.Tensor:
        """logsumexp of s per position."""
        return self.m + torch.log(self.l)


def update_reference(st: VocabStats, logits: torch.Tensor, v0: int, temp: torch.Tensor, seeds: torch.Tensor,
                     pos: torch.Tensor, mask: torch.Tensor | None = None, proc_out: torch.Tensor | None = None):
    """Fold one vocabulary chunk into st (in place). logits [N, v] (any float dtype) for ids v0..v0+v;
    temp [N] float32; seeds, pos [N] int64 (Philox key and counter of each position); mask [N, v] bool
    allowed; proc_out [N, v]: receives s (the sampler's processed logits) when given."""
    n, v = logits.shape
    s = logits.float() / temp[:, None]  # [N, v]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if proc_out is not None:
        proc_out.copy_(s)
    ids = torch.arange(v0, v0 + v, device=logits.device)
    bm, bi = s.max(dim=-1)  # first index of the max, as torch.argmax
    m_new = torch.maximum(st.m, bm)
    m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all -inf so far
    a = torch.exp(st.m - m_use)  # [N]
    d = s - m_use[:, None]
    e = torch.exp(d)  # [N, v]
    term = torch.where(e > 0, e * d, torch.zeros_like(d)).sum(-1)
    shift = torch.where(st.l > 0, st.m - m_use, torch.zeros_like(a))  # nothing summed yet: no -inf * 0
    st.t.copy_(a * (st.t + shift * st.l) + term)
    st.l.copy_(a * st.l + e.sum(-1))
    st.m.copy_(m_new)
    better = bm > st.best
    st.best.copy_(torch.where(better, bm, st.best))
    st.best_id.copy_(torch.where(better, bi + v0, st.best_id))
    g = ph.gumbel(ph.philox(seeds[:, None], ids[None, :], pos[:, None], ph.STREAM_GUMBEL, 0))  # [N, v]
    gm, gi = (s + g).max(dim=-1)
    better = gm > st.gbest
    st.gbest.copy_(torch.where(better, gm, st.gbest))
    st.gbest_id.copy_(torch.where(better, gi + v0, st.gbest_id))
    del ids


def update(st: VocabStats, logits, v0, temp, seeds, pos, mask=None, proc_out=None, impl: str = "auto"):
    """Dispatch: the Triton kernel where it can run (CUDA, or the interpreter), else the reference."""
    if impl == "triton" or (impl == "auto" and logits.is_cuda and use_triton(logits)):
        from .vocab_stats_triton import update_triton

        return update_triton(st, logits, v0, temp, seeds, pos, mask, proc_out)
    return update_reference(st, logits, v0, temp, seeds, pos, mask, proc_out)


def stats_over_vocab(logits: torch.Tensor, temp, seeds, pos, mask=None, proc_out=None, chunk: int = 8192,
                     impl: str = "auto") -> VocabStats:
    """Statistics of full logits [N, V], chunk columns at a time (the Triton kernel takes all V at once)."""
    n, V = logits.shape
    st = VocabStats.new(n, logits.device)
    if impl == "triton" or (impl == "auto" and logits.is_cuda and use_triton(logits)):
        chunk = V
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        update(st, logits[:, v0:v1], v0, temp, seeds, pos, None if mask is None else mask[:, v0:v1],
               None if proc_out is None else proc_out[:, v0:v1], impl=impl)
    return st
