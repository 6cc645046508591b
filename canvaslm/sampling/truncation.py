"""Truncated sampling for the diffusion sampler: top-k, top-p (nucleus) and min-p, per request.

Each denoising step samples every canvas position from softmax(logits / temperature). A request may cut
that distribution first, as vLLM and SGLang let it for autoregressive decoding:

- min_p: drop tokens whose probability is below min_p times the position's most likely token's;
- top_k: keep the k most likely tokens;
- top_p: then keep the smallest set of most likely tokens whose probability (renormalised over what
  min_p and top_k kept) reaches top_p.

Each cut is a per-position logit threshold, so the result is a keep mask: it joins the constraint mask,
and the step then samples, ranks entropies and self-conditions on the cut distribution, exactly as it
does for a constrained position. The argmax always survives, so the committed canvas of a greedy
request is unchanged. Tokens tied with the threshold are kept. Positions are handled a few at a time so
no float32 [positions, vocabulary] temporary is made; rows that cut nothing are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POSITIONS_PER_CHUNK = 16
CANDIDATES = 1024  # top_p searches this many most likely tokens before sorting a whole row


@dataclass
class Truncation:
    """Per-row cut settings as tensors [B], plus the host-side facts the step needs (no sync)."""

    top_k: torch.Tensor  # long, 0 = no cut
    top_p: torch.Tensor  # float32, 1 = no cut
    min_p: torch.Tensor  # float32, 0 = no cut
    k_max: int  # largest top_k of the batch (0: no row cuts by rank)
    any_p: bool  # some row cuts by top_p
    rows: tuple  # rows that cut at all

    @classmethod
    def build(cls, rows: list, device) -> "Truncation | None":
        """rows: DiffusionParams (top_k, top_p, min_p; off: 0, 1, 0); None when no row cuts anything."""
        ks = [r.top_k for r in rows]
        ps = [float(r.top_p) for r in rows]
        mins = [float(r.min_p) for r in rows]
        cutting = tuple(b for b in range(len(rows)) if ks[b] > 0 or ps[b] < 1 or mins[b] > 0)
        if not cutting:
            return None
        return cls(torch.tensor(ks, dtype=torch.long, device=device),
                   torch.tensor(ps, dtype=torch.float32, device=device),
                   torch.tensor(mins, dtype=torch.float32, device=device), max(ks), min(ps) < 1, cutting)


def keep_mask(logits: torch.Tensor, temp: torch.Tensor, cut: Truncation,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which tokens each position may still sample. logits [B, C, V] (any float dtype), temp [B] (the
    step's temperature), mask: optional bool [B, C, V] of allowed tokens (a constraint's). Returns bool
    [B, C, V]: the constraint mask (or all True) with each cutting row's cut applied."""
    B, C, V = logits.shape
    keep = torch.ones(B, C, V, dtype=torch.bool, device=logits.device) if mask is None else mask.clone()
    rows = torch.tensor(cut.rows, device=logits.device)
    flat_rows = (rows[:, None] * C + torch.arange(C, device=logits.device)).reshape(-1)  # [R * C] positions
    pos_row = rows.repeat_interleave(C)  # each position's row
    flat, keep_flat = logits.reshape(B * C, V), keep.view(B * C, V)
    for i in range(0, flat_rows.numel(), POSITIONS_PER_CHUNK):
        idx, owner = flat_rows[i:i + POSITIONS_PER_CHUNK], pos_row[i:i + POSITIONS_PER_CHUNK]
        x = flat.index_select(0, idx).float() / temp.index_select(0, owner)[:, None]
        x = x.masked_fill(~keep_flat.index_select(0, idx), float("-inf"))
        thr = _threshold(x, cut.top_k[owner], cut.top_p[owner], cut.min_p[owner], cut.k_max, cut.any_p)
        keep_flat.index_copy_(0, idx, keep_flat.index_select(0, idx) & (x >= thr[:, None]))
    return keep


def _threshold(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
               k_max: int, cuts_p: bool) -> torch.Tensor:
    """The smallest scaled logit each position keeps. x [N, V] float32 (-inf = not allowed).

    top_p looks for its nucleus among the CANDIDATES most likely tokens first (a top-k, cheap); only
    positions whose nucleus is larger (flat distributions) sort their whole row, found with one host
    sync (only in batches where a row cuts by top_p). A top_k row's nucleus always lies among its k."""
    N, V = x.shape
    thr = torch.full((N,), float("-inf"), device=x.device)
    top = x.max(dim=-1).values
    thr = torch.where(min_p > 0, torch.maximum(thr, top + torch.log(min_p.clamp(min=1e-30))), thr)
    if k_max == 0 and not cuts_p:
        return thr
    cand = torch.topk(x, min(max(k_max, CANDIDATES if cuts_p else 0), V), dim=-1).values  # [N, K], descending
    if k_max > 0:
        k = top_k.clamp(max=V)
        kth = cand.gather(1, (k.clamp(min=1) - 1)[:, None])[:, 0]
        thr = torch.where(k > 0, torch.maximum(thr, kth), thr)
    if not cuts_p:
        return thr
    kept = torch.exp(x - top[:, None]).masked_fill(x < thr[:, None], 0).sum(-1)  # mass of what min_p/top_k keep
    pth, fits = _nucleus(cand.masked_fill(cand < thr[:, None], float("-inf")), top, kept, top_p)
    if not bool(fits.all()):  # some nucleus is larger than the candidates: sort those rows whole
        rows = (~fits).nonzero()[:, 0]
        y = x.index_select(0, rows)
        y = y.masked_fill(y < thr.index_select(0, rows)[:, None], float("-inf"))
        full, _ = _nucleus(torch.sort(y, dim=-1, descending=True).values, top[rows], kept[rows], top_p[rows])
        pth = pth.index_copy(0, rows, full)
    return torch.where(top_p < 1, torch.maximum(thr, pth), thr)


def _nucleus(s: torch.Tensor, top: torch.Tensor, kept: torch.Tensor, top_p: torch.Tensor):
    """(threshold, found) of the top_p nucleus from the leading sorted scaled logits s [N, K] (descending),
    the row maxima `top` and the mass `kept` of everything still allowed (in units of exp(x - top))."""
    probs = torch.exp(s - top[:, None]) / kept[:, None]
    cum = torch.cumsum(probs, dim=-1)
    before = cum - probs  # mass of the tokens ranked above each one
    n_keep = (before < top_p[:, None]).sum(-1).clamp(min=1)
    found = (n_keep < s.shape[1]) | (cum[:, -1] >= top_p) | ~torch.isfinite(s[:, -1])
    return s.gather(1, (n_keep - 1)[:, None])[:, 0], found
