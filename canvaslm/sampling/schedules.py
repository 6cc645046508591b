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


def coldest_temperature(t_min: float, t_max: float, n_steps: int) -> float:
    """The lowest temperature a schedule runs at: its last step's (remaining step 1 of n_steps), above t_min."""
    return t_min + (t_max - t_min) / n_steps


GREEDY_TEMPERATURE = 1e-3  # temperature=0 scales the schedule by this (temperatures must stay > 0)
# The logits are divided by each step's temperature in float32: at or above this, logits up to 3e8 stay finite
# (softcapped ones are below 30); below it they overflow (inf, NaN probabilities, an all-padding output),
# and a schedule that cold draws the argmax anyway.
MIN_TEMPERATURE = 1e-30
