"""Temperature schedules for the denoising loop.

Steps count down: at remaining step n of N the temperature is t_min + (t_max - t_min) * n / N, so the
first step is the hottest. Per-row tensors, so requests with different settings share one batch.
"""

from __future__ import annotations

import torch


def linear_temperature(cur_step: torch.Tensor, n_steps: torch.Tensor, t_min: torch.Tensor,
                       t_span: torch.Tensor) -> torch.Tensor:
    """cur_step, n_steps: int [B]; t_min, t_span (= t_max - t_min, rounded once from double): float32 [B].
    A row that stopped stays in a shared generator's batch while its mates denoise, its cur_step falling to 0
    and below: it keeps its last step's temperature (its draws are discarded), where t_min + span * n / N
    would reach 0 (t_min = 0: NaN probabilities) and then go negative."""
    return t_min + t_span * (cur_step.clamp(min=1).to(torch.int32) / n_steps.to(torch.int32))


GREEDY_TEMPERATURE = 1e-3  # temperature=0 scales the schedule by this (temperatures must stay > 0)
