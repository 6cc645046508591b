"""Adaptive stopping of a canvas: stop when the argmax canvas has been stable for `stability` steps and
the mean token entropy is below `confidence`. State is a tensor history, so the check needs no host sync.
"""

from __future__ import annotations

import torch


def new_history(batch: int, depth: int, canvas_length: int, device) -> torch.Tensor:
    """[B, depth, C] of -1: nothing is stable before `depth` steps have been seen."""
    return torch.full((batch, depth, canvas_length), -1, dtype=torch.long, device=device)


def stable_and_confident(history: torch.Tensor, argmax: torch.Tensor, entropy: torch.Tensor,
                         stability: torch.Tensor, confidence: torch.Tensor):
    """Returns (stop [B] bool, updated history). stability: int [B] (<= depth), confidence: float [B]."""
    depth = history.shape[1]
    same = (history == argmax[:, None, :]).all(dim=-1)  # [B, depth]
    considered = torch.arange(depth, device=argmax.device)[None, :] >= depth - stability[:, None]
    stable = (same | ~considered).all(dim=-1)
    if depth:
        history = torch.cat([history[:, 1:], argmax[:, None, :]], dim=1)
    confident = entropy.mean(dim=-1) < confidence
    return stable & confident, history
