"""Per-request logit adjustments, applied to the decoder's logits at every denoising step before
temperature and sampling, so they move the samples, the entropy ranking and the committed argmax alike.

`logit_bias` (OpenAI's field): an additive bias on chosen tokens' logits at every canvas position; -100
all but bans a token, +100 all but forces it. `min_tokens` (vLLM's field): the end-of-output ids (EOS and
stop_token_ids) are banned at every canvas position before the N-th output token."""

from __future__ import annotations

import math

import torch

LIMIT = 100.0  # OpenAI's range: [-100, 100]


class LogitBiasError(ValueError):
    pass


def normalize(bias, field: str = "logit_bias", vocab: int | None = None) -> tuple[tuple[int, float], ...]:
    """{token id (int or ASCII decimal text): bias} -> sorted ((id, bias), ...), checked. Empty for None/{}.
    Text keys are ASCII digits only (int() would also take "5_0", " 7 " or Arabic-Indic digits), and two keys
    may not name one id ("5" and "05"): either would silently bias a token the caller did not write."""
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    out, keys = {}, {}
    for key, value in items:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise LogitBiasError(f"{field}: key {key!r} is not a token id")
        digits = key[1:] if isinstance(key, str) and key.startswith("-") else key  # "-1": refused by range below
        if isinstance(key, str) and not (digits.isascii() and digits.isdigit()):
            raise LogitBiasError(f"{field}: key {key!r} is not a token id (ASCII digits, e.g. \"50256\")")
        token = int(key)
        if token in keys:
            raise LogitBiasError(f"{field}: keys {keys[token]!r} and {key!r} both name token id {token}")
        keys[token] = key
        if token < 0 or (vocab is not None and token >= vocab):
            raise LogitBiasError(f"{field}: token id {token} is outside the vocabulary [0, {vocab})" if vocab
                                 else f"{field}: token id {token} is negative")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > LIMIT:
            raise LogitBiasError(f"{field}[{key!r}] = {value!r}; expected a number in [-100, 100]")
        out[token] = float(value)
    return tuple(sorted(out.items()))


def dense(pairs: tuple[tuple[int, float], ...], vocab: int, device) -> torch.Tensor | None:
    """[V] float32 bias for one request, or None when it has none. float32 as the decoder's logits are, whatever
    the model's dtype: in bfloat16, 57.3 was 57.25 and 99.9 was 100.0."""
    if not pairs:
        return None
    ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    values = torch.tensor([v for _, v in pairs], dtype=torch.float32)
    return torch.zeros(vocab, dtype=torch.float32).index_put_((ids,), values).to(device)


def ban_before(logits: torch.Tensor, row: int, canvas_start: int, min_tokens: int, ids) -> None:
    """min_tokens: ban `ids` at the positions of row `row`'s canvas (its first token is output token
    `canvas_start`) that come before output token `min_tokens`."""
    cut = min(logits.shape[1], min_tokens - canvas_start)
    if cut > 0:
        logits[row, :cut, list(ids)] = float("-inf")


def apply(logits: torch.Tensor, rows: list[torch.Tensor | None]) -> torch.Tensor:
    """Add each row's [V] bias to its logits [B, C, V] in place (rows without one are untouched)."""
    for b, bias in enumerate(rows):
        if bias is not None:
            logits[b] += bias
    return logits
