"""Likelihoods under the encoder's causal pass: DiffusionGemma's encoder is trained with a next-token
loss, so it scores text like an autoregressive LM. Used to pick an infill's middle (mean log-prob of
middle + suffix) and for `logprobs` / `echo` on /v1/completions (each token's log-prob and the top
alternatives). Logits are taken a block of positions at a time, so no fp32 [T, V] copy is made.
`embed_rows` pools the same pass's hidden states into text embeddings (/v1/embeddings, `LLM.embed`).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .sampling.samplers import ban_unsampleable, sampleable_vocab

ROWS_PER_BLOCK = 64  # positions per log-softmax block (64 x 262k fp32 = 67 MB)


@torch.no_grad()
def encode_rows(model, rows: list, images: list | None = None) -> torch.Tensor:
    """Hidden states [B, T, d] of token rows (each from position 0) under one causal encoder pass.
    images: per row, the multimodal.ImageInputs of its image positions (or None)."""
    from .multimodal import encoder_images

    device = model.embed_weight.device
    B, T = len(rows), max(len(r) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
        positions[b, :len(r)] = torch.arange(len(r))
    cache = KVCache(model.cfg, B, T, dtype=model.embed_weight.dtype, device=device)
    embeds, mask = encoder_images([(b, im, 0, len(r)) for b, (r, im) in enumerate(zip(rows, images or [None] * B))],
                                  B, T, device)
    return model.encode(tokens.to(device), positions.to(device), torch.arange(B, device=device), cache, fresh=True,
                        image_embeds=embeds, image_mask=mask)


@torch.no_grad()
def batch_token_logprobs(model, seqs: list, starts: list, top_k: int = 0, batch_size: int = 16,
                         progress=None, ranks: bool = False, images: list | None = None) -> list:
    """For each sequence `ids` and its `start`, at positions t = start..len(ids)-1: log p(ids[t] | ids[:t])
    and the top_k alternatives as [(id, log-prob)] (most likely first); `batch_size` sequences per
    encoder call, `progress(n)` after each. -> [(logprobs, tops)], or with `ranks` [(logprobs, tops,
    ranks)], where a token's rank is 1 + how many tokens are more likely than it there. images: per
    sequence, the ImageInputs of its prompt's image positions (or None)."""
    images = images or [None] * len(seqs)
    for ids, start in zip(seqs, starts):
        if not 1 <= start <= len(ids):
            raise ValueError(f"token_logprobs: start={start} must be in [1, {len(ids)}]")
    out = []
    for lo in range(0, len(seqs), batch_size):
        group = list(zip(seqs[lo:lo + batch_size], starts[lo:lo + batch_size]))
        hidden = encode_rows(model, [list(ids) for ids, _ in group], images[lo:lo + batch_size])
        for b, (ids, start) in enumerate(group):
            out.append(_block_logprobs(model, hidden[b, start - 1:len(ids) - 1], list(ids[start:]), top_k, ranks)
                       if start < len(ids) else ([], [], []) if ranks else ([], []))
        if progress is not None:
            progress(len(group))
    return out


def token_logprobs(model, ids: list, start: int = 1, top_k: int = 0) -> tuple[list, list]:
    """`batch_token_logprobs` of one sequence. -> (logprobs, tops)."""
    return batch_token_logprobs(model, [ids], [start], top_k)[0]


@torch.no_grad()
def score_continuations(model, prompt_ids: list, conts: list, held: tuple | None = None,
                        kv_dtype: torch.dtype | None = None, chunk: int | None = None) -> list:
    """Mean log p(cont | prompt) per token under the encoder's causal pass (0.0 for an empty
    continuation). -> [float]. The shared prompt is encoded once into a one-row cache, and the
    continuations are encoded together behind it, every row reading that row (nothing is written): an
    infill's candidates (or best_of's completions) cost one prompt, not one each, and one prompt's KV.
    held: (cache, slot, head) where the cache slot's KV holds exactly the prompt (a serving engine's slot)
    and head is the hidden state [d] of its last position (`Runner.prompt_head`): the prompt is not
    encoded at all. Without one, kv_dtype and chunk say how a serving engine stores and encodes a prompt
    (its KV dtype, e.g. float8, and its prefill chunk): the prompt is encoded the same way, so a score does
    not depend on whether a freed slot happened to hold the prompt (an fp8 cache rounds the keys and values
    that later chunks read)."""
    device, P = model.embed_weight.device, len(prompt_ids)
    B, T = len(conts), max((len(c) for c in conts), default=0)
    if T == 0:
        return [0.0] * B
    if held is None:
        dtype = model.embed_weight.dtype
        cache = KVCache(model.cfg, 1, P + T, dtype=kv_dtype or dtype, device=device, compute_dtype=dtype)
        step = chunk or P
        for start in range(0, P, step):
            end = min(P, start + step)
            head = model.encode(torch.tensor([list(prompt_ids[start:end])], device=device),
                                torch.arange(start, end, device=device)[None], torch.zeros(1, dtype=torch.long,
                                device=device), cache, fresh=start == 0, max_position=end - 1)
        held = (cache, 0, head[0, -1])
    cache, slot, head = held
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    for b, c in enumerate(conts):
        tokens[b, :len(c)] = torch.tensor(list(c), dtype=torch.long)
        positions[b, :len(c)] = torch.arange(P, P + len(c))
    slots = torch.full((B,), slot, dtype=torch.long, device=device)
    hidden = model.encode(tokens.to(device), positions.to(device), slots, cache, write=False, max_position=P + T - 1)
    out = []
    for b, c in enumerate(conts):
        if not c:
            out.append(0.0)
            continue
        h = torch.cat([head[None].to(hidden.dtype), hidden[b, :len(c) - 1]])  # the state before each token
        lp, _ = _block_logprobs(model, h, list(c), 0)
        out.append(sum(lp) / len(lp))
    return out


def loglikelihoods(model, pairs: list, batch_size: int = 16, progress=None) -> list:
    """lm-evaluation-harness's loglikelihood: for each (context ids, continuation ids), the summed
    log p(continuation | context) and whether the continuation is the greedy one (every token the
    argmax), under the encoder's causal pass, `batch_size` pairs per encoder call. -> [(float, bool)]."""
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("loglikelihood: the context and the continuation need a token each "
                             "(the context at least BOS)")
    scored = batch_token_logprobs(model, [list(c) + list(t) for c, t in pairs], [len(c) for c, _ in pairs], 1,
                                  batch_size, progress)
    return [(sum(lp), all(top[0][0] == t for top, t in zip(tops, cont)))
            for (lp, tops), (_, cont) in zip(scored, pairs)]


def _block_logprobs(model, hidden: torch.Tensor, targets: list, top_k: int, ranks: bool = False) -> tuple:
    logprobs, tops, rank = [], [], []
    # over the ids the model may output: padded embedding rows past the tokenizer's ids (never sampled)
    # take no probability mass, and never show in a rank, a top-k or a greedy flag
    sampleable = sampleable_vocab(model)
    top_k = min(top_k, sampleable or top_k)
    for lo in range(0, len(targets), ROWS_PER_BLOCK):
        logits = ban_unsampleable(model.logits(hidden[lo:lo + ROWS_PER_BLOCK]), sampleable)
        logp = torch.log_softmax(logits, dim=-1)  # [n, V] fp32
        tgt = torch.tensor(targets[lo:lo + ROWS_PER_BLOCK], device=logp.device)
        own = logp.gather(1, tgt[:, None])  # [n, 1]
        logprobs += own[:, 0].tolist()
        if ranks:
            rank += ((logp > own).sum(1) + 1).tolist()
        if top_k:
            vals, idx = logp.topk(top_k, dim=-1)
            tops += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return (logprobs, tops, rank) if ranks else (logprobs, tops)


POOLINGS = ("mean", "last")


@torch.no_grad()
def embed_rows(model, seqs: list, pooling: str = "mean", normalize: bool = True, batch_size: int = 16) -> torch.Tensor:
    """Text embeddings from the encoder's final-normed hidden states: the mean over each sequence's tokens
    (`mean`) or its last token's (`last`, the one that has seen them all), L2-normalised unless told not
    to; `batch_size` sequences per encoder call. -> float32 [N, d]."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("embed: every input needs at least one token")
    out = []
    for lo in range(0, len(seqs), batch_size):
        group = [list(s) for s in seqs[lo:lo + batch_size]]
        hidden = encode_rows(model, group).float()  # [B, T, d]
        for b, ids in enumerate(group):
            h = hidden[b, :len(ids)]
            out.append(h.mean(dim=0) if pooling == "mean" else h[-1])
    emb = torch.stack(out).cpu()
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


__all__ = ["encode_rows", "score_continuations", "token_logprobs", "batch_token_logprobs", "loglikelihoods",
           "embed_rows", "POOLINGS", "ROWS_PER_BLOCK"]
