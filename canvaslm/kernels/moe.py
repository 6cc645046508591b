"""Fused mixture-of-experts for the decoder step: tokens grouped by expert, each expert's weights streamed
once, gate/up projection + GELU(tanh) * up fused in one kernel, down projection (times the routing
weight) in a second. The reference is `model.moe.Experts._loop`.

Routing is aligned on the device with no host sync (so the step can be captured in a CUDA graph): the
assignments (token, slot) are sorted by expert and each expert's run is padded to a multiple of BLOCK_M;
the grid is launched for the worst case and blocks past the end exit at once. Optional per-output-channel
weight scales let the same kernels read FP8 weights (dequantised in registers, bf16 math).
"""

from __future__ import annotations

import torch

BLOCK_M = 16  # a 256-token canvas routes ~16 tokens to each of 128 experts (top-8): one block per expert


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """ids [N, K] -> (sorted_assignments [M_pad] int32 (N*K = padding), block_expert [num_blocks] int32
    (-1 = unused block)). An assignment a = token * K + slot. No host sync: sizes are worst-case bounds."""
    flat = ids.reshape(-1)
    nk = flat.numel()
    num_blocks = (nk + num_experts * (block_m - 1) + block_m - 1) // block_m
    order = torch.argsort(flat, stable=True)  # [NK] assignments grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts
    pstart = torch.cumsum(padded, 0) - padded
    e_sorted = flat[order]
    rank = torch.arange(nk, device=ids.device) - start[e_sorted]
    sorted_a = torch.full((num_blocks * block_m,), nk, dtype=torch.int32, device=ids.device)
    sorted_a[pstart[e_sorted] + rank] = order.to(torch.int32)
    block_first = torch.arange(num_blocks, device=ids.device) * block_m
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), block_first, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_a, block_expert


def int4_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, group: int,
                bias: torch.Tensor | None = None, block_m: int = BLOCK_M) -> torch.Tensor:
    """x [..., in] @ dequant(w)^T (+ bias) with w packed int4 [out, ceil(in / 2)] and group scales
    [out, n_groups]: the down kernel as a one-expert MoE with routing weight 1, so the packed weight is
    read once and never dequantised to memory. Returns [..., out] in x's dtype."""
    from .moe_triton import down_kernel, launch

    flat = x.reshape(-1, x.shape[-1]).contiguous()
    N, out_features = flat.shape[0], w.shape[0]
    blocks = -(-N // block_m)
    rows = torch.arange(blocks * block_m, dtype=torch.int32, device=x.device)
    sorted_a = torch.where(rows < N, rows, N)  # every row, in order; N marks padding
    block_expert = torch.zeros(blocks, dtype=torch.int32, device=x.device)
    y = torch.empty(N, out_features, dtype=torch.float32, device=x.device)
    ones = torch.ones(N, dtype=torch.float32, device=x.device)
    launch(down_kernel, flat, w[None], scale[None], y, sorted_a, block_expert, ones, 1, out_features,
           x.shape[-1], block_m, group=group)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def fused_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
              down_scale: torch.Tensor | None = None, block_m: int = BLOCK_M, group: int = 0) -> torch.Tensor:
    """x [N, d], weights [N, K] float32, ids [N, K]; gate_up [E, 2I, d], down [E, d, I] (bf16/fp32, or
    float8 with per-output-channel scales gate_up_scale [E, 2I], down_scale [E, d], or with `group` > 0
    packed int4 [E, 2I, d / 2] and [E, d, I / 2] with group scales [E, 2I, d / group], [E, d, I / group]).
    Returns [N, d]."""
    from .moe_triton import down_kernel, gate_up_kernel, launch

    N, d = x.shape
    K = ids.shape[1]
    E, two_i, _ = gate_up.shape
    inner = two_i // 2
    sorted_a, block_expert = align_by_expert(ids, E, block_m)
    x = x.contiguous()
    inter = torch.empty(N * K, inner, dtype=x.dtype, device=x.device)  # [NK, I]
    launch(gate_up_kernel, x, gate_up, gate_up_scale, inter, sorted_a, block_expert, None, K, inner, d, block_m,
           group=group)
    y = torch.empty(N * K, d, dtype=torch.float32, device=x.device)  # [NK, d]
    launch(down_kernel, inter, down, down_scale, y, sorted_a, block_expert, weights.reshape(-1).float().contiguous(),
           1, d, inner, block_m, group=group)
    return y.view(N, K, d).sum(1).to(x.dtype)  # fixed-order sum over the K slots: deterministic
