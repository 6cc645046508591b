"""Triton kernels of `kernels.moe.fused_moe` (imported only where Triton can run)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _acc_dot(acc, a, wbase, s_base, cols, ks, k0, stride_wn, n_groups, mask, col_ok, INT4: tl.constexpr,
             GROUP: tl.constexpr, GROUP_SCALE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ w[cols, ks]^T for one k-block, a [BLOCK_M, BLOCK_K]. INT4: two 4-bit codes a byte,
    unpacked here, with group scales [rows, n_groups] at s_base. When the k-block lies inside one group
    (GROUP_SCALE) the dot runs on the integer codes and the group's scale multiplies its partial result
    once per column; otherwise every value is scaled before the dot. PRECISION: float32 activations
    get full float32 dots ("ieee"), not TF32 (which Triton uses for float32 by default)."""
    if INT4:
        byte = tl.load(wbase + cols[None, :] * stride_wn + ks[:, None] // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(mask, ((byte >> ((ks[:, None] % 2) * 4)) & 15) - 8, 0).to(tl.float32)  # [BK, BN]
        if GROUP_SCALE:
            scale = tl.load(s_base + cols * n_groups + k0 // GROUP, mask=col_ok, other=0.0)  # [BN]
            return acc + tl.dot(a, code.to(a.dtype), input_precision=PRECISION) * scale[None, :]
        scale = tl.load(s_base + cols[None, :] * n_groups + ks[:, None] // GROUP, mask=mask, other=0.0)
        return tl.dot(a, (code * scale).to(a.dtype), acc, input_precision=PRECISION)
    w = tl.load(wbase + cols[None, :] * stride_wn + ks[:, None], mask=mask, other=0.0)
    return tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)


@triton.jit
def gate_up_kernel(x, w, w_scale, out, sorted_a, block_expert, route_w, nk, K, n_out, d_in, n_groups,
                   stride_xm, stride_we, stride_wn, stride_om, HAS_SCALE: tl.constexpr, INT4: tl.constexpr,
                   GROUP: tl.constexpr, GROUP_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[a, n] = gelu_tanh(x[a // K] . w[e, n]) * (x[a // K] . w[e, n_out + n]) for a block's rows."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert + pid_m)
    if e >= 0:
        rows = tl.load(sorted_a + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows < nk
        tok = tl.where(valid, rows // K, 0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        wbase = w + e.to(tl.int64) * stride_we
        s_base = w_scale + e.to(tl.int64) * (2 * n_out * n_groups)  # INT4: group scales [2 * n_out, n_groups]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < d_in
            a = tl.load(x + tok[:, None] * stride_xm + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            wmask = k_ok[:, None] & col_ok[None, :]
            acc_g = _acc_dot(acc_g, a, wbase, s_base, cols, ks, k0, stride_wn, n_groups, wmask, col_ok,
                             INT4, GROUP, GROUP_SCALE, PRECISION)
            acc_u = _acc_dot(acc_u, a, wbase, s_base, cols + n_out, ks, k0, stride_wn, n_groups, wmask, col_ok,
                             INT4, GROUP, GROUP_SCALE, PRECISION)
        if HAS_SCALE:
            sbase = w_scale + e.to(tl.int64) * (2 * n_out)
            acc_g = acc_g * tl.load(sbase + cols, mask=col_ok, other=0.0)[None, :]
            acc_u = acc_u * tl.load(sbase + n_out + cols, mask=col_ok, other=0.0)[None, :]
        z = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        z = tl.minimum(tl.maximum(z, -20.0), 20.0)  # tanh is +-1 to fp32 precision there; exp stays finite
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
        h = 0.5 * acc_g * (1.0 + tanh) * acc_u
        optr = out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(optr, h.to(out.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(x, w, w_scale, out, sorted_a, block_expert, route_w, nk, K, n_out, d_in, n_groups,
                stride_xm, stride_we, stride_wn, stride_om, HAS_SCALE: tl.constexpr, INT4: tl.constexpr,
                GROUP: tl.constexpr, GROUP_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[a, n] = route_w[a] * (x[a] . w[e, n]); x here is the [NK, I] intermediate (K = 1)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert + pid_m)
    if e >= 0:
        rows = tl.load(sorted_a + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows < nk
        src = tl.where(valid, rows, 0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        wbase = w + e.to(tl.int64) * stride_we
        s_base = w_scale + e.to(tl.int64) * (n_out * n_groups)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < d_in
            a = tl.load(x + src[:, None] * stride_xm + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            acc = _acc_dot(acc, a, wbase, s_base, cols, ks, k0, stride_wn, n_groups,
                           k_ok[:, None] & col_ok[None, :], col_ok, INT4, GROUP, GROUP_SCALE, PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(w_scale + e.to(tl.int64) * n_out + cols, mask=col_ok, other=0.0)[None, :]
        acc = acc * tl.load(route_w + src, mask=valid, other=0.0)[:, None]
        optr = out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(optr, acc.to(out.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def launch(kernel, x, w, w_scale, out, sorted_a, block_expert, route_w, K, n_out, d_in, block_m,
           block_n: int = 64, block_k: int = 64, group: int = 0):
    """One program per (expert block of rows, BLOCK_N output columns); weights are [E, n_out(*2), d_in],
    or with `group` > 0 packed int4 [E, n_out(*2), ceil(d_in / 2)] with w_scale [E, n_out(*2), n_groups]."""
    nk = out.shape[0]
    block_n = max(16, min(block_n, triton.next_power_of_2(n_out)))
    block_k = max(16, min(block_k, triton.next_power_of_2(d_in)))
    w = w.contiguous()
    scale = w_scale.float().contiguous() if w_scale is not None else out
    grid = (block_expert.numel(), triton.cdiv(n_out, block_n))
    n_groups = -(-d_in // group) if group else 1
    kernel[grid](x, w, scale, out, sorted_a, block_expert, route_w if route_w is not None else out, nk, K,
                 n_out, d_in, n_groups, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                 HAS_SCALE=w_scale is not None and not group, INT4=group > 0, GROUP=max(group, 1),
                 GROUP_SCALE=group > 0 and group % block_k == 0,
                 PRECISION="ieee" if x.dtype == torch.float32 else None, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_K=block_k)
