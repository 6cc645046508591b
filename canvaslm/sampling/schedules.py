"""Temperature schedules for the denoising loop.

Steps count down: at remaining step n of N the temperature is t_min + (t_max - t_min) * n / N, so the
first step is the hottest. Per-row tensors, so requests with different settings share one batch.
"""

from __future__ import annotations

import torch


def linear_temperature(cur_step: torch.Tensor, n_steps: torch.Tensor, t_min: torch.Tensor,
                       t_span: torch.Tensor) -> torch.Tensor:
    """cur_step, n_steps: int [B]; t_min, t_span (= t_max - t_min, rounded once from double): float32 [B]."""
    return t_min + t_span * (cur_step.to(torch.int32) / n_steps.to(torch.int32))

GREEDY_TEMPERATURE = 1e-3  # temperature=0 scales the schedule by this (temperatures must stay > 0)
