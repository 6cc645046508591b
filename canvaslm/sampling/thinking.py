"""Thinking budgets: at most N tokens in a reply's thought channel (`<|channel>...<channel|>`,
canvaslm.reasoning), vLLM's `thinking_token_budget`, Anthropic's `thinking.budget_tokens`, llama.cpp's
`--reasoning-budget`. Without one, a thinking model may spend the whole `max_tokens` on its thought and
leave no answer, the complaint these knobs answer.

An autoregressive engine counts thought tokens as they come and forces the closing token once the count
is reached. A diffusion canvas is denoised as a whole, so here the budget is a position: the thought's
first token is the one after the opening `<|channel>` (output index s), and the closing `<channel|>` must
sit at or before index s + N. Every denoising step, for a canvas that holds index s + N, the step's own
argmax (what the canvas commits if this step is its last) is read: when it closes the channel before
s + N nothing is forced; otherwise the logits at s + N become the closing token alone. Positions are
re-decided every step and a canvas commits its last step's argmax, so the committed reply's thought never
has more than N tokens (the label `thought\\n` counts, as every token after the opening one). A thought
that opens inside the canvas is found in that argmax too. All of it is tensor work on the step's logits,
with no host sync; the host only tracks, canvas by canvas, where the thought started and whether it closed.

A constrained output (JSON, a forced tool call, ...) and a model whose vocabulary has no channel tokens
write no thought, so a budget asks nothing of them and is left out. With thinking on, a constrained chat
reply thinks first (`thought_room`, `closed_thought`: the server's ThoughtFirst, LLM._thought_first): the
thought runs as a request of its own, unconstrained and under the budget, then the answer under the
constraint. The budget covers the reply's first thought channel (Gemma 4 thinks once, at the start of
its reply); a prompt that ends inside an open channel (a prefilled thought, `continue_final_message`)
counts the thought's tokens already in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reasoning import open_channel
from .regex import PaddedSlotConstraint


class ThinkingBudgetError(ValueError):
    """A thinking budget that is not a count of tokens."""


@dataclass(frozen=True)
class ThinkingBudget:
    tokens: int  # most thought tokens (those after the opening token, before the closing one)
    open_id: int  # `<|channel>`
    close_id: int  # `<channel|>`
    turns: object = None  # reasoning.Turns: only a channel in the prompt's last turn, the model's, counts

    def __post_init__(self):
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 0:
            raise ThinkingBudgetError(f"thinking_token_budget must be an integer >= 0, got {self.tokens!r}")

    @classmethod
    def for_tokenizer(cls, tokens: int | None, tokenizer) -> "ThinkingBudget | None":
        """The budget in this tokenizer's channel tokens; None for None, and None when the tokenizer has no
        thought channel (its replies hold no thought, so any budget is met)."""
        from ..reasoning import ThoughtSplitter

        splitter = None if tokens is None else ThoughtSplitter.for_tokenizer(tokenizer)
        return None if splitter is None else cls(tokens, splitter.open_id, splitter.close_id, splitter.turns)

    def tracker(self, prompt_ids=()) -> "ThoughtTracker":
        return ThoughtTracker(self, prompt_ids)


class ThoughtTracker:
    """One request's progress through its thought, on the host: how many output tokens are committed,
    where the thought's first token is (output index; <= 0 when it opened in the prompt) and whether the
    channel has closed. `apply` forces the close on one canvas's logits; `commit` reads each committed
    piece of output."""

    def __init__(self, budget: ThinkingBudget, prompt_ids=()):
        self.budget = budget
        self.n_out = 0
        self.start: int | None = None
        self.closed = False
        start = open_channel(prompt_ids, budget.open_id, budget.close_id, budget.turns)
        if start is not None:  # the prompt ends inside an open channel (the model's turn): its thought so far counts
            self.start = start + 1 - len(prompt_ids)

    def commit(self, ids) -> None:
        for j, t in enumerate(ids):
            if self.closed:
                break
            if self.start is None:
                if t == self.budget.open_id:
                    self.start = self.n_out + j + 1
            elif t == self.budget.close_id:
                self.closed = True
        self.n_out += len(ids)

    def apply(self, logits: torch.Tensor, canvas_start: int) -> None:
        """Force the close, if due, in the logits [C, V] of a canvas whose first token is output index
        `canvas_start` (in place; after biases and penalties, before sampling)."""
        if self.closed:
            return
        C, n = logits.shape[0], self.budget.tokens
        if self.start is None:
            if n + 1 >= C:  # a thought opening in this canvas cannot reach its budget inside it
                return
        elif self.start - canvas_start + n >= C:  # its last allowed position is in a later canvas
            return
        draft = logits.argmax(dim=-1)  # [C]: what this step commits, before the force
        if self.start is not None:  # positions known on the host: no host-to-device copy
            first = self.start - canvas_start
            limit = max(first + n, 0)  # where the close must be, at the latest
            closed = (draft[max(first, 0):limit] == self.budget.close_id).any()
            row = torch.arange(limit, limit + 1, device=logits.device)
            due = ~closed
        else:  # the thought opens in this canvas, if anywhere: found in the draft
            at = torch.arange(C, device=logits.device)
            is_open = draft == self.budget.open_id
            first = torch.where(is_open.any(), is_open.long().argmax() + 1, C)  # its first thought token
            limit = first + n
            closed = ((draft == self.budget.close_id) & (at >= first) & (at < limit)).any()
            row = limit.clamp(0, C - 1).view(1)
            due = (limit < C) & ~closed
        old = logits.index_select(0, row)  # [1, V]
        forced = torch.full_like(old, float("-inf"))
        forced[:, self.budget.close_id] = 0
        logits.index_copy_(0, row, torch.where(due, forced, old))


def answer_need(constraint, canvas_length: int) -> int:
    """The fewest tokens a constrained answer needs."""
    return constraint.min_new_tokens(canvas_length) if hasattr(constraint, "min_new_tokens") else 1


def thought_room(constraint, max_new_tokens: int, prompt_len: int, max_len: int, canvas_length: int) -> int:
    """Tokens a thought-first reply's thought request may generate (0: no room to think): max_new_tokens less
    the channel's two markers (a thought cut at its room is closed by one more token) and what the
    constrained answer needs, such that the thought request and then the answer (rounded up to whole
    canvases after prompt + thought) both fit `max_len` positions."""
    C = canvas_length
    need = answer_need(constraint, C)
    return max(0, min(max_new_tokens - need - 2, max_len - prompt_len - 2 - -(-need // C) * C,
                      (max_len - prompt_len - 1) // C * C))


def thought_reserve(budget_tokens: int | None, max_new_tokens: int | None, constraint) -> int:
    """Tokens an output as wide as max_new_tokens (`constraint` a regex.PaddedSlotConstraint built at that
    width: JSON mode, a regex, a grammar) leaves for a thought before it: the budget and its two markers, or
    half of max_new_tokens without a budget, cut so that the output keeps its shortest value and EOS; 0 for
    any other constraint, when that leaves no room for the two markers, or when max_new_tokens is not given."""
    if not max_new_tokens or not isinstance(constraint, PaddedSlotConstraint):
        return 0
    reserve = budget_tokens + 2 if budget_tokens is not None else max_new_tokens // 2
    reserve = min(reserve, max_new_tokens - constraint.shortest() - 1)
    return reserve if reserve >= 2 else 0


def answer_seed(seed: int) -> int:
    """The seed of a thought-first reply's answer, from its thought's: far from the seeds of the replies
    beside it (choices and prompts take consecutive seeds), so no two requests share a random stream."""
    return (seed + 2**62) % 2**63


def answer_time(max_time: float | None, thought_seconds: float) -> float | None:
    """The answer's latency budget: what the thought's denoising left of the reply's max_time (one step at
    least)."""
    return None if max_time is None else max(max_time - thought_seconds, 1e-3)


def answer_room(max_new_tokens: int, head_len: int, prompt_len: int, max_len: int, canvas_length: int) -> int:
    """Tokens the answer of a thought-first reply may generate after its `head_len` thought tokens: what
    max_new_tokens leaves, in whole canvases within `max_len` positions."""
    C = canvas_length
    return min(max_new_tokens - head_len, (max_len - prompt_len - head_len) // C * C)


def closed_thought(open_id: int, close_id: int, thought_ids, finish_reason: str) -> list | None:
    """The reply's head once its thought request has ended (`thought_ids`, its output after the opening
    token): the opening token, the thought and its close (added when the request ran out of room, as a
    budget closes it), or None when an EOS ended the reply inside the thought."""
    head = [open_id, *thought_ids]
    if head[-1] != close_id:
        if finish_reason == "stop":
            return None
        head.append(close_id)
    return head


__all__ = ["ThinkingBudget", "ThoughtTracker", "ThinkingBudgetError", "answer_need", "thought_room", "answer_room",
           "thought_reserve", "answer_seed", "answer_time", "closed_thought"]
