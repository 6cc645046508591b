"""Likelihoods under the encoder's causal pass: DiffusionGemma's encoder is trained with a next-token
loss, so it scores text like an autoregressive LM. Used to pick an infill's middle (mean log-prob of
middle + suffix) and for `logprobs` / `echo` on /v1/completions (each token's log-prob and the top
alternatives). Logits are taken a block of positions at a time, so no fp32 [T, V] copy is made.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache

ROWS_PER_BLOCK = 64  # positions per log-softmax block (64 x 262k fp32 = 67 MB)


@torch.no_grad()
def encode_rows(model, rows: list) -> torch.Tensor:
    """Hidden states [B, T, d] of token rows (each from position 0) under one causal encoder pass."""
    device = model.embed_weight.device
    B, T = len(rows), max(len(r) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
        positions[b, :len(r)] = torch.arange(len(r))
    cache = KVCache(model.cfg, B, T, dtype=model.embed_weight.dtype, device=device)
    return model.encode(tokens.to(device), positions.to(device), torch.arange(B, device=device), cache, fresh=True)


@torch.no_grad()
def score_continuations(model, prompt_ids: list, conts: list) -> list:
    """Mean log p(cont | prompt) per token under the encoder's causal pass, one batched call. -> [float]."""
    hidden = encode_rows(model, [list(prompt_ids) + list(c) for c in conts])
    out, P = [], len(prompt_ids)
    for b, c in enumerate(conts):
        if not c:
            out.append(0.0)
            continue
        lp, _ = _block_logprobs(model, hidden[b, P - 1:P - 1 + len(c)], list(c), 0)
        out.append(sum(lp) / len(lp))
    return out


@torch.no_grad()
def token_logprobs(model, ids: list, start: int = 1, top_k: int = 0) -> tuple[list, list]:
    """For positions t = start..len(ids)-1: log p(ids[t] | ids[:t]) and the top_k alternatives as
    [(id, log-prob)] (most likely first). -> (logprobs, tops)."""
    if not 1 <= start <= len(ids):
        raise ValueError(f"token_logprobs: start={start} must be in [1, {len(ids)}]")
    if start == len(ids):
        return [], []
    hidden = encode_rows(model, [list(ids)])[0]
    return _block_logprobs(model, hidden[start - 1:len(ids) - 1], list(ids[start:]), top_k)


@torch.no_grad()
def batch_token_logprobs(model, seqs: list, starts: list, top_k: int = 0, batch_size: int = 16) -> list:
    """`token_logprobs` of many sequences, `batch_size` per encoder call. -> [(logprobs, tops)]."""
    for ids, start in zip(seqs, starts):
        if not 1 <= start <= len(ids):
            raise ValueError(f"token_logprobs: start={start} must be in [1, {len(ids)}]")
    out = []
    for lo in range(0, len(seqs), batch_size):
        group = list(zip(seqs[lo:lo + batch_size], starts[lo:lo + batch_size]))
        hidden = encode_rows(model, [list(ids) for ids, _ in group])
        for b, (ids, start) in enumerate(group):
            out.append(_block_logprobs(model, hidden[b, start - 1:len(ids) - 1], list(ids[start:]), top_k)
                       if start < len(ids) else ([], []))
    return out


@torch.no_grad()
def loglikelihoods(model, pairs: list, batch_size: int = 16, progress=None) -> list:
    """lm-evaluation-harness's loglikelihood: for each (context ids, continuation ids), the summed
    log p(continuation | context) and whether the continuation is the greedy one (every token the
    argmax), under the encoder's causal pass, `batch_size` pairs per encoder call. -> [(float, bool)]."""
    out = []
    for lo in range(0, len(pairs), batch_size):
        batch = pairs[lo:lo + batch_size]
        for ctx, cont in batch:
            if not ctx or not cont:
                raise ValueError("loglikelihood: the context and the continuation need a token each "
                                 "(the context at least BOS)")
        hidden = encode_rows(model, [list(c) + list(t) for c, t in batch])
        for b, (ctx, cont) in enumerate(batch):
            lp, tops = _block_logprobs(model, hidden[b, len(ctx) - 1:len(ctx) + len(cont) - 1], list(cont), 1)
            out.append((sum(lp), all(top[0][0] == t for top, t in zip(tops, cont))))
        if progress is not None:
            progress(len(batch))
    return out


def _block_logprobs(model, hidden: torch.Tensor, targets: list, top_k: int) -> tuple[list, list]:
    logprobs, tops = [], []
    for lo in range(0, len(targets), ROWS_PER_BLOCK):
        logp = torch.log_softmax(model.logits(hidden[lo:lo + ROWS_PER_BLOCK]), dim=-1)  # [n, V] fp32
        tgt = torch.tensor(targets[lo:lo + ROWS_PER_BLOCK], device=logp.device)
        logprobs += logp.gather(1, tgt[:, None])[:, 0].tolist()
        if top_k:
            vals, idx = logp.topk(top_k, dim=-1)
            tops += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return logprobs, tops


__all__ = ["encode_rows", "score_continuations", "token_logprobs", "batch_token_logprobs", "loglikelihoods",
           "ROWS_PER_BLOCK"]
