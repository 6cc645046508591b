"""Int4 weights, activations in the model dtype (W4A16): what fits the 26B-A4B model on a 24 GB GPU.

A weight [..., out, in] is cut along `in` into groups of `group` (default 128) values; each group has
one float32 scale = max |w| / 7, and each value is stored as round(w / scale) in [-8, 7], offset by 8
into a 4-bit code. Two codes share a byte (even column in the low nibble, odd in the high one), so a
weight takes 0.5 byte + 4 bytes per group: the 26B-A4B model in 14.5 GB. Forward passes:
- reference (CPU, or no Triton): dequantise to the activation dtype and run the plain maths; experts
  dequantise only the experts the tokens picked;
- CUDA with Triton: the fused MoE kernels read the packed experts and unpack them in registers
  (`kernels.moe.fused_moe(..., group=G)`), a quarter of the bf16 bytes; linears run the same down
  kernel as a one-expert MoE (`kernels.moe.int4_linear`). Training (a gradient to pass) takes the
  reference path.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import QuantizedExperts, fill_quantized_linear, use_fused_kernel

GROUP = 128
QMAX = 7


class Int4Error(ValueError):
    """An int4 setting or tensor is not usable."""


def _check_group(group) -> int:
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise Int4Error(f"int4 group size must be a positive integer, got {group!r}")
    return group


CHUNK_VALUES = 1 << 24  # quantise ~16 M values (64 MB of float32 temporaries) at a time


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (packed uint8 [..., out, ceil(in / 2)], scale float32 [..., out, ceil(in / group)]).
    Works through the rows in chunks, so quantising a 1 GB bf16 expert tensor on a nearly full GPU
    needs tens of MB of temporaries, not several float32 copies of it."""
    group = _check_group(group)
    *lead, out, inn = w.shape
    packed = torch.empty(*lead, out, math.ceil(inn / 2), dtype=torch.uint8, device=w.device)
    scale = torch.empty(*lead, out, math.ceil(inn / group), dtype=torch.float32, device=w.device)
    rows, p_rows, s_rows = w.reshape(-1, inn), packed.view(-1, packed.shape[-1]), scale.view(-1, scale.shape[-1])
    step = max(1, CHUNK_VALUES // max(inn, 1))
    for i in range(0, rows.shape[0], step):
        p_rows[i:i + step], s_rows[i:i + step] = _quantize_rows(rows[i:i + step], group)
    return packed, scale


def _quantize_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int4 of a [rows, in] block."""
    wf = w.float()
    inn = wf.shape[-1]
    ng = math.ceil(inn / group)
    padded = F.pad(wf, (0, ng * group - inn))  # zeros do not change a group's max
    scale = padded.unflatten(-1, (ng, group)).abs().amax(-1).clamp(min=1e-12) / QMAX  # [rows, ng]
    q = (padded / scale.repeat_interleave(group, -1)).round().clamp(-8, 7)[..., :inn]
    codes = (q + 8).to(torch.uint8)
    if inn % 2:
        codes = F.pad(codes, (0, 1), value=8)  # a zero weight in the unused high nibble
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, in_features: int, group: int = GROUP,
                    dtype=torch.float32) -> torch.Tensor:
    """Inverse of `quantize_int4`: [..., out, in] in `dtype`."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)[..., :in_features]  # [..., out, in]
    s = scale.float().repeat_interleave(group, -1)[..., :in_features]
    return ((codes.float() - 8) * s).to(dtype)


class Int4Linear(nn.Module):
    """y = x @ dequant(weight)^T + bias; weight is packed uint8 [out, ceil(in / 2)], weight_scale
    float32 [out, ceil(in / group)]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group: int = GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, _check_group(group)
        self.weight = nn.Parameter(torch.empty(out_features, math.ceil(in_features / 2), dtype=torch.uint8),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, math.ceil(in_features / group)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.impl = "auto"  # "triton" | "dequant" | "auto" (the fused kernel on CUDA when no gradient is needed)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group: int = GROUP) -> "Int4Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group)
        return fill_quantized_linear(m, lin, *quantize_int4(lin.weight.detach(), group))

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The weight [out, in] as a plain tensor (for merging adapters and exporting)."""
        return dequantize_int4(self.weight, self.weight_scale, self.in_features, self.group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused_kernel(self.impl, x, x):
            from .kernels.moe import int4_linear

            return int4_linear(x, self.weight, self.weight_scale, self.group, self.bias)
        w = self.dequantized(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class Int4Experts(QuantizedExperts):
    """`model.moe.Experts` with int4 weights: gate_up_proj uint8 [E, 2I, d / 2] with gate_up_proj_scale
    [E, 2I, d / group], down_proj uint8 [E, d, I / 2] with down_proj_scale [E, d, I / group]."""

    def __init__(self, d: int, inner: int, num_experts: int, group: int = GROUP):
        super().__init__()
        self.d, self.inner, self.num_experts, self.group = d, inner, num_experts, _check_group(group)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, math.ceil(d / 2), dtype=torch.uint8),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, d, math.ceil(inner / 2), dtype=torch.uint8),
                                      requires_grad=False)
        self.register_buffer("gate_up_proj_scale", torch.ones(num_experts, 2 * inner, math.ceil(d / group)))
        self.register_buffer("down_proj_scale", torch.ones(num_experts, d, math.ceil(inner / group)))
        self.impl = "auto"  # "triton" | "dequant" | "auto"

    @classmethod
    def from_experts(cls, ex, group: int = GROUP) -> "Int4Experts":
        E, two_i, d = ex.gate_up_proj.shape
        m = cls(d, two_i // 2, E, group)
        for name in ("gate_up_proj", "down_proj"):
            q, s = quantize_int4(getattr(ex, name).detach(), group)
            setattr(m, name, nn.Parameter(q, requires_grad=False))
            setattr(m, f"{name}_scale", s)
        return m

    def dequantized(self, dtype=torch.float32) -> dict:
        """{gate_up_proj, down_proj} as plain [E, out, in] tensors (for exporting)."""
        return {"gate_up_proj": dequantize_int4(self.gate_up_proj, self.gate_up_proj_scale, self.d, self.group, dtype),
                "down_proj": dequantize_int4(self.down_proj, self.down_proj_scale, self.inner, self.group, dtype)}

    def expert(self, e: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, d], down [d, I]) dequantised to `dtype`."""
        return (dequantize_int4(self.gate_up_proj[e], self.gate_up_proj_scale[e], self.d, self.group, dtype),
                dequantize_int4(self.down_proj[e], self.down_proj_scale[e], self.inner, self.group, dtype))
