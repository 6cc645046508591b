"""LoRA adapters for DiffusionGemma: low-rank updates W + (alpha/r) B A on chosen projections, merged
back into plain weights for export.

Linear projections are wrapped (`LoRALinear`: y = base(x) + scale * (x A^T) B^T, cheap for any width).
Experts (3-D weights [E, out, in]) get a per-expert low-rank delta through a parametrization, so both MoE
implementations see W_e + scale * B_e A_e without changes. B starts at zero: a fresh adapter leaves the
model exactly as it was. `merge_lora` folds every update into the base weights and removes the adapters,
leaving a model whose parameter names match the checkpoint again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # Linear module names (the last path component)
    include_experts: bool = False  # also adapt the MoE experts' gate_up_proj / down_proj
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = set(self.targets) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(f"lora.targets: unknown module names {sorted(unknown)}; expected a subset of "
                             f"{list(DEFAULT_TARGETS)}")

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        allowed = {"rank", "alpha", "targets", "include_experts", "dropout"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"lora: unknown keys {sorted(unknown)}; expected some of {sorted(allowed)}")
        return cls(**d)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.scale = base, scale
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # [out, in]
            self.base.weight.copy_((self.base.weight.float() + delta).to(self.base.weight.dtype))
        return self.base


class ExpertLoRA(nn.Module):
    """Parametrization of a 3-D expert weight [E, out, in]: W + scale * B @ A per expert."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        E, out_dim, in_dim = weight.shape
        self.scale = scale
        self.lora_A = nn.Parameter(torch.randn(E, rank, in_dim, dtype=weight.dtype, device=weight.device)
                                   / math.sqrt(in_dim))
        self.lora_B = nn.Parameter(torch.zeros(E, out_dim, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + torch.bmm(self.lora_B, self.lora_A) * self.scale


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the target projections (and optionally experts) in place; freeze everything else.
    Returns the names of the adapted modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in cfg.targets:
                setattr(module, child_name, LoRALinear(child, cfg.rank, cfg.scale, cfg.dropout))
                adapted.append(f"{name}.{child_name}" if name else child_name)
        if cfg.include_experts and hasattr(module, "gate_up_proj") and hasattr(module, "num_experts"):
            for pname in ("gate_up_proj", "down_proj"):
                parametrize.register_parametrization(module, pname, ExpertLoRA(getattr(module, pname),
                                                                               cfg.rank, cfg.scale))
                adapted.append(f"{name}.{pname}")
    if not adapted:
        raise ValueError(f"lora: no module matched targets {list(cfg.targets)}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return adapted


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted model's weights under checkpoint names, adapters folded in; the model is untouched.
    (A deepcopy + merge_lora would not do: parametrized modules share their generated class, and
    removing a parametrization edits that class.)"""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            delta = (module.lora_B.float() @ module.lora_A.float()) * module.scale
            out[f"{name}.weight"] = (module.base.weight.float() + delta).to(module.base.weight.dtype)
        elif parametrize.is_parametrized(module):
            for pname in module.parametrizations.keys():
                out[f"{name}.{pname}"] = getattr(module, pname).detach().clone()
    for k, v in model.state_dict().items():
        if "lora_" in k or ".parametrizations." in k:
            continue
        out.setdefault(k.replace(".base.", "."), v)
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore the plain module tree (in place)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
        if parametrize.is_parametrized(module):
            for pname in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
    return model


__all__ = ["LoRAConfig", "LoRALinear", "ExpertLoRA", "apply_lora", "merge_lora", "merged_state_dict", "lora_state_dict", "has_lora",
           "DEFAULT_TARGETS"]
