"""Mixture of experts: a softmax top-k router and 3-D expert weight tensors (HF layout).

`Experts.forward` picks an implementation: a per-expert loop (the reference, simple and exact), every
expert on every token weighted by the routing (`dense`: no host sync, for a few small experts), a
sorted grouped GEMM (`torch._grouped_mm` on CUDA) or the fused Triton kernels (`kernels.moe`, the CUDA
default when Triton is installed). All take the same routing and give the same sums. Only the loop and
the dense path have a backward pass, so `auto` picks one of them whenever gradients are needed
(training): dense on a GPU when there are at most twice top-k experts, else the loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RMSNorm


class Router(nn.Module):
    """RMS-normalised, scaled projection -> softmax -> top-k, renormalised, times a per-expert scale."""

    def __init__(self, d: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.root = d ** -0.5
        self.norm = RMSNorm(d, eps, with_scale=False)
        self.proj = nn.Linear(d, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(d))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, d] -> (weights [N, K] float32, expert ids [N, K])."""
        scores = self.proj(self.norm(x) * self.scale * self.root)  # [N, E]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


def choose_impl(is_cuda: bool, needs_grad: bool, triton_ok: bool, has_grouped_mm: bool,
                few_experts: bool = False) -> str:
    """What `impl="auto"` runs. Training (a graph that needs gradients) takes the loop, or on a GPU with
    few experts (`few_experts`: at most twice top-k) the dense path: the Triton kernels write plain output
    buffers (no autograd, so experts and router would silently get no gradient) and `torch._grouped_mm`'s
    backward is not available for every dtype and device."""
    if needs_grad:
        return "dense" if is_cuda and few_experts else "loop"
    if not is_cuda:
        return "loop"
    return "triton" if triton_ok else "grouped" if has_grouped_mm else "loop"


class Experts(nn.Module):
    """E gated-GELU experts stored as gate_up_proj [E, 2I, d] and down_proj [E, d, I]."""

    def __init__(self, d: int, inner: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, d))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d, inner))
        self.impl = "auto"  # "loop" | "grouped" | "triton" | "auto"

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad
                                                  or self.gate_up_proj.requires_grad)
        impl = self.impl
        if impl == "auto":
            from ..kernels import triton_available

            impl = choose_impl(x.is_cuda, needs_grad, triton_available(), hasattr(torch, "_grouped_mm"),
                               few_experts=self.num_experts <= 2 * ids.shape[-1])
        elif needs_grad and impl not in ("loop", "dense"):
            raise ValueError(f"Experts.impl={impl!r} has no backward pass; training needs impl 'loop', 'dense' "
                             f"or 'auto'")
        if impl == "triton":
            from ..kernels.moe import fused_moe

            return fused_moe(x, weights, ids, self.gate_up_proj, self.down_proj)
        if impl == "dense":
            return self._dense(x, weights, ids)
        return self._grouped(x, weights, ids) if impl == "grouped" else self._loop(x, weights, ids)

    def _loop(self, x, weights, ids):
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            xe = x[tok]
            if len(tok) < 16:  # BLAS takes other kernels for a few rows: pad, so results are batch-invariant
                xe = torch.cat([xe, xe.new_zeros(16 - len(tok), xe.shape[1])])
            gate, up = F.linear(xe, self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])[:len(tok)]
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out

    def _dense(self, x, weights, ids):
        """Every expert on every token, weighted by the routing (zero off each token's top-k): E / K times
        the loop's expert arithmetic, but a fixed handful of kernels, no host sync, and a backward pass.
        For a few small experts on a GPU, where launches and syncs cost more than the arithmetic."""
        w = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        w = w.scatter_add(1, ids, weights)  # [N, E]
        gate, up = torch.einsum("nd,ehd->neh", x, self.gate_up_proj).chunk(2, dim=-1)
        y = torch.einsum("nei,edi->ned", F.gelu(gate, approximate="tanh") * up, self.down_proj)  # [N, E, d]
        return (y * w[..., None].to(y.dtype)).sum(1).to(x.dtype)

    def _grouped(self, x, weights, ids):
        """Tokens sorted by expert, one grouped GEMM per projection; no host sync, no Python loop."""
        N, K = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // K
        # not bincount: on CUDA it reads the largest id back to the host to size its output
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[tok]  # [N*K, d]
        h = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs)  # [N*K, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm((F.gelu(gate, approximate="tanh") * up).contiguous(),
                              self.down_proj.transpose(1, 2), offs=offs)  # [N*K, d]
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))
