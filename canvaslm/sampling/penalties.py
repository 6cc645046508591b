"""Frequency, presence and repetition penalties (OpenAI's `frequency_penalty` / `presence_penalty`,
vLLM's `repetition_penalty`) for a canvas being denoised.

An autoregressive model penalises what it generated so far, a prefix. A canvas has no prefix: all its
positions are drafted together. Here the output so far, as position i of the canvas sees it, is the
output committed in earlier canvases plus the current draft (the previous step's argmax canvas, up to
its first end token) at every position but i. A first step has no draft yet and sees committed output
only. With n_i(v) the count of token v in that output:

- frequency_penalty f and presence_penalty p: logit[i, v] -= f * n_i(v) + p * [n_i(v) > 0]
  (each in [-2, 2]; positive values discourage repeats).
- repetition_penalty r in [0.01, 100] (vLLM's and transformers' multiplicative one): for every token v in the
  prompt or in that output, a positive logit[i, v] is divided by r and a negative one multiplied by r
  (r > 1 discourages repeats, 1 is off).

Both apply to the decoder's logits after `logit_bias` and before temperature and sampling, so they move
the samples, the entropy ranking and the committed argmax alike, as `logit_bias` does. Only requests
that set a penalty pay for it: one [V] count vector per request and a pass over its own logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REPETITION_RANGE = (0.01, 100.0)  # beyond it the factor (or its inverse) only overflows: logits are within +-30
POSITIONS_PER_CHUNK = 16  # the repetition penalty's [positions, V] temporaries are this many rows tall


class PenaltyError(ValueError):
    pass


@dataclass(frozen=True)
class Penalties:
    frequency: float = 0.0
    presence: float = 0.0
    repetition: float = 1.0

    def __post_init__(self):
        for name, value in (("frequency_penalty", self.frequency), ("presence_penalty", self.presence)):
            if not _number(value) or not -2 <= value <= 2:
                raise PenaltyError(f"{name} must be a number in [-2, 2] (0: off), got {value!r}")
        if not _number(self.repetition) or not REPETITION_RANGE[0] <= self.repetition <= REPETITION_RANGE[1]:
            raise PenaltyError(f"repetition_penalty must be a number in [{REPETITION_RANGE[0]}, "
                               f"{REPETITION_RANGE[1]}] (1: off), got {self.repetition!r}")

    @property
    def active(self) -> bool:
        return self.frequency != 0 or self.presence != 0 or self.repetition != 1

    @classmethod
    def of(cls, params) -> "Penalties | None":
        """The penalties a `DiffusionParams` asks for, or None when it asks for none."""
        pen = cls(params.frequency_penalty, params.presence_penalty, params.repetition_penalty)
        return pen if pen.active else None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class PenaltyState:
    """One request's penalties and what they count: its committed output and, for the repetition
    penalty, its prompt."""

    def __init__(self, penalties: Penalties, prompt_ids, end_ids, vocab: int, device):
        self.pen, self.vocab = penalties, vocab
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)  # [V] committed output
        self.seen = None  # [V] bool: prompt or committed output (repetition penalty only)
        if penalties.repetition != 1:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        self.end_ids = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)

    def commit(self, tokens) -> None:
        """Count output tokens just committed (a list or a 1-D id tensor)."""
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.counts.device)
        if ids.numel():
            self.counts.index_add_(0, ids, torch.ones(ids.numel(), device=self.counts.device))
            if self.seen is not None:
                self.seen[ids] = True

    def apply(self, logits: torch.Tensor, draft: torch.Tensor | None = None) -> torch.Tensor:
        """Penalise one row's logits [C, V] in place. draft: the previous step's argmax canvas [C], or
        None at a canvas's first step."""
        f, p, r = self.pen.frequency, self.pen.presence, self.pen.repetition
        n = self.counts
        if draft is not None:
            valid = torch.cumsum(torch.isin(draft, self.end_ids).long(), 0) == 0  # [C]: before the first end
            n = n.index_add(0, draft, valid.float())
            own = logits.gather(1, draft[:, None])[:, 0]  # [C] each position's own draft token, unpenalised
        if r != 1:
            seen = self.seen | (n > 0)
            for i in range(0, logits.shape[0], POSITIONS_PER_CHUNK):
                block = logits[i:i + POSITIONS_PER_CHUNK]
                scale = torch.where(block > 0, 1 / r, r).to(block.dtype)
                block.mul_(scale.masked_fill_(~seen, 1.0))
        if f or p:
            logits.sub_((f * n + p * (n > 0).float()).to(logits.dtype))
        if draft is not None:  # a position's own draft token is not part of what it repeats
            m = n.gather(0, draft) - valid.float()  # [C] n_i at the position's own token
            value = own
            if r != 1:
                again = self.seen.gather(0, draft) | (m > 0)
                value = torch.where(again, value * torch.where(value > 0, 1 / r, r).to(value.dtype), value)
            if f or p:
                value = value - (f * m + p * (m > 0).float()).to(value.dtype)
            logits.scatter_(1, draft[:, None], value[:, None])
        return logits


def penalty_state(params, prompt_ids, end_ids, vocab: int, device) -> PenaltyState | None:
    """A request's `PenaltyState` for its resolved `DiffusionParams`, or None when it sets no penalty."""
    pen = Penalties.of(params)
    return None if pen is None else PenaltyState(pen, prompt_ids, end_ids, vocab, device)
