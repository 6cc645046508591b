"""FP8 (e4m3) weights: quantisation, FP8 linear and expert modules, what FP8 and int4 (`quant_int4`)
modules share, and `quantize_model`. Reading and writing quantised checkpoints: `quant_io`.

Scales are float32 and multiply the stored e4m3 values back: w ~= q * scale, with one scale per output
channel (`channel`, shape [out, 1] / experts [E, out]), per 128x128 tile (`block`, [ceil(out/128),
ceil(in/128)]) or per tensor. Forward passes:
- CPU or no Hopper support: dequantise to the activation dtype and run the plain maths (the reference).
- CUDA, per-channel: `torch._scaled_mm` with per-token dynamic activation scales (W8A8); experts read
  FP8 through the fused Triton MoE kernel (dequantised in registers, half the bytes of bf16).
Checkpoints: bf16 weights quantised while loading (`load_model(..., quantization="fp8")`), or
pre-quantised compressed-tensors checkpoints (`quant_method: compressed-tensors`, `X.weight` in
float8_e4m3fn with `X.weight_scale`; 3-D expert tensors `X` with `X_scale`).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
STRATEGIES = ("channel", "block", "tensor")
QUANTIZATIONS = ("fp8", "int4")  # what load_model / quantize_model can quantise to
# Linear layers that become FP8: attention, dense MLP, self-conditioning MLP. The router, norms and the
# tied embedding / LM head stay in the model dtype (small, and precision-sensitive).
_FP8_LINEAR = re.compile(r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|self_conditioning\.(gate|up|down)_proj)$")


def is_quantized(t: torch.Tensor) -> bool:
    """A tensor stored quantised: FP8 codes (a one-byte float) or packed int4 (uint8)."""
    return not t.is_floating_point() or t.element_size() == 1


class QuantError(ValueError):
    """A quantisation setting or a quantised checkpoint is not supported or inconsistent."""


def scale_shape(shape: tuple, strategy: str) -> tuple:
    """Scale shape for a weight [..., out, in]."""
    *lead, out, inn = shape
    if strategy == "channel":
        return (*lead, out, 1)
    if strategy == "block":
        return (*lead, math.ceil(out / BLOCK), math.ceil(inn / BLOCK))
    if strategy == "tensor":
        return (*lead, 1, 1)
    raise QuantError(f"FP8 strategy {strategy!r} is not supported; expected one of {STRATEGIES}")


def _expand(scale: torch.Tensor, shape: tuple, strategy: str) -> torch.Tensor:
    """Broadcastable per-element scale for a weight of `shape`."""
    if strategy != "block":
        return scale
    out, inn = shape[-2:]
    return scale.repeat_interleave(BLOCK, -2)[..., :out, :].repeat_interleave(BLOCK, -1)[..., :inn]


def quantize_fp8(w: torch.Tensor, strategy: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q float8_e4m3fn, scale float32 of `scale_shape`). Stacked matrices (experts)
    are quantised one at a time, so the float32 temporaries are those of one matrix, not of all."""
    if w.dim() <= 2:
        return _quantize_fp8_matrix(w, strategy)
    flat = w.reshape(-1, *w.shape[-2:])
    q = torch.empty(flat.shape, dtype=FP8, device=w.device)
    scale = torch.empty(flat.shape[0], *scale_shape(tuple(flat.shape[-2:]), strategy), device=w.device)
    for i in range(flat.shape[0]):
        q[i], scale[i] = _quantize_fp8_matrix(flat[i], strategy)
    return q.view(w.shape), scale.view(*w.shape[:-2], *scale.shape[-2:])


def _quantize_fp8_matrix(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.float()
    *lead, out, inn = wf.shape
    if strategy == "channel":
        amax = wf.abs().amax(-1, keepdim=True)
    elif strategy == "tensor":
        amax = wf.abs().amax((-2, -1), keepdim=True)
    elif strategy == "block":
        po, pi = math.ceil(out / BLOCK) * BLOCK, math.ceil(inn / BLOCK) * BLOCK
        padded = F.pad(wf.abs(), (0, pi - inn, 0, po - out))
        amax = padded.view(*lead, po // BLOCK, BLOCK, pi // BLOCK, BLOCK).amax((-3, -1))
    else:
        scale_shape(wf.shape, strategy)  # raises
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (wf / _expand(scale, wf.shape, strategy)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, strategy: str, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * _expand(scale.float(), q.shape, strategy)).to(dtype)


def _scaled_mm_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(x.device) >= (8, 9)


class FP8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q stored in float8_e4m3fn (HF names: weight, weight_scale)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, strategy: str = "channel"):
        super().__init__()
        self.in_features, self.out_features, self.strategy = in_features, out_features, strategy
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(scale_shape((out_features, in_features), strategy)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, strategy: str = "channel") -> "FP8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, strategy)
        return fill_quantized_linear(m, lin, *quantize_fp8(lin.weight.detach(), strategy))

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The weight [out, in] as a plain tensor (for merging adapters and exporting)."""
        return dequantize_fp8(self.weight, self.weight_scale, self.strategy, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad  # QLoRA: _scaled_mm has no backward
        if self.strategy == "channel" and _scaled_mm_ok(x) and x.dtype in (torch.bfloat16, torch.float16) \
                and not needs_grad:
            flat = x.reshape(-1, x.shape[-1])
            x_scale = flat.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1] per token
            xq = (flat / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                                 bias=self.bias, out_dtype=x.dtype)
            return y.view(*x.shape[:-1], -1)
        w = dequantize_fp8(self.weight, self.weight_scale, self.strategy, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def fill_quantized_linear(m: nn.Module, lin: nn.Linear, q: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """A quantised linear `m` takes the codes and scales of `lin`'s weight, and a copy of its bias."""
    m.weight = nn.Parameter(q, requires_grad=False)
    m.weight_scale = scale
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return m


class QuantizedExperts(nn.Module):
    """What FP8 and int4 experts share: the forward contract of `model.moe.Experts` ((x [N, d], weights
    [N, K], ids [N, K]) -> [N, d]), served by the fused Triton kernels or by the reference below, which
    dequantises the experts the tokens picked (`expert(e, dtype)`) and runs the per-expert loop's maths."""

    group = 0  # int4 group size; 0: FP8 per-channel scales

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if use_fused_kernel(self.impl, x, weights):
            from .kernels.moe import fused_moe

            return fused_moe(x, weights, ids, self.gate_up_proj, self.down_proj, self.gate_up_proj_scale,
                             self.down_proj_scale, group=self.group)
        return self._dequant(x, weights, ids)

    def _dequant(self, x, weights, ids):
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            gu, dn = self.expert(e, x.dtype)
            gate, up = F.linear(x[tok], gu).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, dn)
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out


class FP8Experts(QuantizedExperts):
    """`model.moe.Experts` with FP8 weights and per-output-channel scales (gate_up_proj_scale [E, 2I],
    down_proj_scale [E, d])."""

    def __init__(self, d: int, inner: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, d, dtype=FP8), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, d, inner, dtype=FP8), requires_grad=False)
        self.register_buffer("gate_up_proj_scale", torch.ones(num_experts, 2 * inner))
        self.register_buffer("down_proj_scale", torch.ones(num_experts, d))
        self.impl = "auto"  # "triton" | "dequant" | "auto"

    @classmethod
    def from_experts(cls, ex) -> "FP8Experts":
        E, two_i, d = ex.gate_up_proj.shape
        m = cls(d, two_i // 2, E)
        for name in ("gate_up_proj", "down_proj"):
            q, s = quantize_fp8(getattr(ex, name).detach(), "channel")
            setattr(m, name, nn.Parameter(q, requires_grad=False))
            setattr(m, f"{name}_scale", s.squeeze(-1))
        return m

    def dequantized(self, dtype=torch.float32) -> dict:
        """{gate_up_proj, down_proj} as plain [E, out, in] tensors (for exporting)."""
        return {n: (getattr(self, n).float() * getattr(self, f"{n}_scale")[..., None]).to(dtype)
                for n in ("gate_up_proj", "down_proj")}

    def expert(self, e: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, d], down [d, I]) dequantised to `dtype`."""
        return tuple((getattr(self, n)[e].float() * getattr(self, f"{n}_scale")[e, :, None]).to(dtype)
                     for n in ("gate_up_proj", "down_proj"))


def use_fused_kernel(impl: str, x: torch.Tensor, weights: torch.Tensor) -> bool:
    """Quantised experts (and int4 linears) take the fused Triton kernels when asked, or under "auto" on
    CUDA with Triton, unless a gradient has to flow through them (QLoRA training): the kernels have no
    backward, so the dequantising path, which autograd follows, runs instead."""
    from .kernels import triton_available

    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad)
    if impl == "triton" and needs_grad:
        raise ValueError("quantised modules with impl='triton' have no backward pass; use impl 'auto' or "
                         "'dequant' when training")
    return impl == "triton" or (impl == "auto" and not needs_grad and x.is_cuda and triton_available())


def _fp8_targets(model) -> tuple[list[str], list[str]]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _FP8_LINEAR.search(n)]
    experts = [n for n, m in model.named_modules() if n.endswith(".experts")]
    return linears, experts


def _swap(model, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def quantize_model(model, strategy: str = "channel", fmt: str = "fp8"):
    """Swap attention / MLP linears and experts for FP8 (or, fmt="int4", int4) modules, quantising their
    weights (in place)."""
    from .quant_int4 import Int4Experts, Int4Linear

    if fmt not in QUANTIZATIONS:
        raise QuantError(f"quantization {fmt!r} is not supported; expected one of {QUANTIZATIONS}")
    linears, experts = _fp8_targets(model)
    for n in linears:
        lin = model.get_submodule(n)
        _swap(model, n, Int4Linear.from_linear(lin) if fmt == "int4" else FP8Linear.from_linear(lin, strategy))
    for n in experts:
        ex = model.get_submodule(n)
        _swap(model, n, Int4Experts.from_experts(ex) if fmt == "int4" else FP8Experts.from_experts(ex))
    return model


def parameter_count(model) -> int:
    """The model's weights as the unquantised model counts them: a packed int4 byte holds two (its
    padding nibble aside), an FP8 code one; scales are not weights."""
    from .quant_int4 import Int4Experts, Int4Linear

    total = 0
    for m in model.modules():
        if isinstance(m, Int4Linear):
            total += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, Int4Experts):
            total += m.num_experts * 3 * m.inner * m.d  # gate_up [2I, d] + down [d, I] per expert
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def weight_bytes(model) -> int:
    """Bytes a forward pass reads for weights: parameters plus quantisation scales."""
    scales = (b for n, b in model.named_buffers() if n.endswith("_scale"))
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *scales))
