"""LoRA adapters for DiffusionGemma: low-rank updates W + (alpha/r) B A on chosen projections, merged
back into plain weights for export.

Linear projections are wrapped (`LoRALinear`: y = base(x) + scale * (x A^T) B^T, cheap for any width).
Experts (3-D weights [E, out, in]) get a per-expert low-rank delta through a parametrization, so both MoE
implementations see W_e + scale * B_e A_e without changes. B starts at zero: a fresh adapter leaves the
model exactly as it was. `merge_lora` folds every update into the base weights and removes the adapters,
leaving a model whose parameter names match the checkpoint again.

QLoRA: the base may be quantised (`quant.FP8Linear`, `quant_int4.Int4Linear`, frozen); adapters are
float32 and train as usual, and merging dequantises the base and adds the update, so an export is a
plain float checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..config import ConfigError
from ..quant import is_quantized
from .typecheck import check_fields

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # Linear module names (the last path component)
    include_experts: bool = False  # also adapt the MoE experts' gate_up_proj / down_proj
    dropout: float = 0.0

    def __post_init__(self):
        check_fields(self, "lora.")  # each value of its annotated type (numeric strings -> float)
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):  # .inf / .nan would train to NaN weights
            raise ValueError(f"lora.alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets and not self.include_experts:
            raise ValueError("lora.targets is empty and lora.include_experts is false: nothing to adapt")
        unknown = set(self.targets) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(f"lora.targets: unknown module names {sorted(unknown)}; expected a subset of "
                             f"{list(DEFAULT_TARGETS)}")

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"lora must be a mapping ({{rank: 8, alpha: 16, ...}}) or null, got {d!r}")
        allowed = {"rank", "alpha", "targets", "include_experts", "dropout"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"lora: unknown keys {sorted(map(str, unknown))}; expected some of {sorted(allowed)}")
        return cls(**d)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _quantized_linears() -> tuple:
    from ..quant import FP8Linear
    from ..quant_int4 import Int4Linear

    return FP8Linear, Int4Linear


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A linear's weight [out, in] as a float tensor, dequantised if the linear is quantised."""
    return linear.dequantized(torch.float32) if isinstance(linear, _quantized_linears()) else linear.weight.float()


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        """base: nn.Linear, or a quantised linear (its packed weight does not give the shape or dtype)."""
        super().__init__()
        self.base, self.scale = base, scale
        w = base.weight
        dtype = torch.float32 if is_quantized(w) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """Base weight + scale * B A, float32 [out, in]."""
        return dense_weight(self.base) + (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            if isinstance(self.base, _quantized_linears()):  # a quantised base becomes a plain linear
                w = self.merged_weight()
                lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                                device=w.device)
                lin.weight.copy_(w)
                if self.base.bias is not None:
                    lin.bias.copy_(self.base.bias)
                return lin.requires_grad_(False)
            self.base.weight.copy_(self.merged_weight().to(self.base.weight.dtype))
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
            if isinstance(child, (nn.Linear, *_quantized_linears())) and child_name in cfg.targets:
                setattr(module, child_name, LoRALinear(child, cfg.rank, cfg.scale, cfg.dropout))
                adapted.append(f"{name}.{child_name}" if name else child_name)
        if cfg.include_experts and hasattr(module, "gate_up_proj") and hasattr(module, "num_experts"):
            if is_quantized(module.gate_up_proj):
                raise ValueError(f"lora.include_experts: {name} holds quantised experts, which take no adapter")
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
    out, quantized = {}, set()
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            w = module.base.weight
            out[f"{name}.weight"] = module.merged_weight().to(torch.float32 if is_quantized(w) else w.dtype)
            if isinstance(module.base, _quantized_linears()):
                quantized.add(f"{name}.base")
        elif parametrize.is_parametrized(module):
            for pname in module.parametrizations.keys():
                out[f"{name}.{pname}"] = getattr(module, pname).detach().clone()
        elif hasattr(module, "dequantized") and id(module) not in wrapped:  # quantised, without adapter
            quantized.add(name)
            dense = module.dequantized(torch.float32)
            if isinstance(dense, dict):
                out.update({f"{name}.{k}": v for k, v in dense.items()})
            else:
                out[f"{name}.weight"] = dense
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if "lora_" in k or ".parametrizations." in k or (mod in quantized and leaf.endswith("_scale")):
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
           "dense_weight", "DEFAULT_TARGETS"]
