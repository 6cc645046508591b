"""Triton kernel of `vocab_stats.update_reference`: one program per position streams its logits row once
(BLOCK entries at a time), drawing the Gumbel noise in registers. Imported only when Triton can run."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import STREAM_GUMBEL


@triton.jit
def _vocab_stats_kernel(logits, stride_ln, v_len, v0, temp, seeds, pos, mask, stride_mn, proc, stride_pn,
                        m_ptr, l_ptr, t_ptr, best_ptr, best_id_ptr, gbest_ptr, gbest_id_ptr,
                        HAS_MASK: tl.constexpr, WRITE_PROC: tl.constexpr, STREAM: tl.constexpr,
                        BLOCK: tl.constexpr):
    n = tl.program_id(0)
    row = logits + n.to(tl.int64) * stride_ln
    tau = tl.load(temp + n)
    seed = tl.load(seeds + n)
    p = tl.load(pos + n).to(tl.uint32)
    m = tl.load(m_ptr + n)
    l = tl.load(l_ptr + n)
    t = tl.load(t_ptr + n)
    best = tl.load(best_ptr + n)
    best_id = tl.load(best_id_ptr + n)
    gbest = tl.load(gbest_ptr + n)
    gbest_id = tl.load(gbest_id_ptr + n)
    neg_inf = float("-inf")
    for start in range(0, v_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < v_len
        s = tl.load(row + offs, mask=inside, other=neg_inf).to(tl.float32) / tau
        if HAS_MASK:
            ok = tl.load(mask + n.to(tl.int64) * stride_mn + offs, mask=inside, other=0)
            s = tl.where(ok != 0, s, neg_inf)
        if WRITE_PROC:
            tl.store(proc + n.to(tl.int64) * stride_pn + offs, s.to(proc.dtype.element_ty), mask=inside)
        s = tl.where(inside, s, neg_inf)
        bm = tl.max(s, axis=0)
        bi = tl.argmax(s, axis=0, tie_break_left=True)
        m_new = tl.maximum(m, bm)
        m_use = tl.where(m_new == neg_inf, 0.0, m_new)
        a = tl.exp(m - m_use)
        live = s > neg_inf
        d = tl.where(live, s - m_use, 0.0)  # masked entries add nothing (and no inf * 0)
        e = tl.where(live, tl.exp(d), 0.0)
        term = tl.sum(e * d, axis=0)
        shift = tl.where(l > 0, m - m_use, 0.0)  # nothing summed yet: avoid -inf * 0
        t = a * (t + shift * l) + term
        l = a * l + tl.sum(e, axis=0)
        m = m_new
        best_id = tl.where(bm > best, (bi + start + v0).to(tl.int64), best_id)
        best = tl.maximum(best, bm)
        vocab_ids = (offs + v0).to(tl.uint32)
        zero = vocab_ids * 0
        bits, _, _, _ = tl.philox(seed, vocab_ids, zero + p, zero + STREAM, zero)
        # philox.gumbel: v = (x + 0.5) / 2**32 below 1, -log(1 - v) (its series for v < 2**-7)
        v = tl.minimum((bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10, 0.9999999403953552)
        e = tl.where(v < 0.0078125, v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * 0.25))), -tl.log(1.0 - v))
        key = s - tl.log(e)
        gm = tl.max(key, axis=0)
        gi = tl.argmax(key, axis=0, tie_break_left=True)
        gbest_id = tl.where(gm > gbest, (gi + start + v0).to(tl.int64), gbest_id)
        gbest = tl.maximum(gbest, gm)
    tl.store(m_ptr + n, m)
    tl.store(l_ptr + n, l)
    tl.store(t_ptr + n, t)
    tl.store(best_ptr + n, best)
    tl.store(best_id_ptr + n, best_id)
    tl.store(gbest_ptr + n, gbest)
    tl.store(gbest_id_ptr + n, gbest_id)


def update_triton(st, logits: torch.Tensor, v0: int, temp, seeds, pos, mask=None, proc_out=None,
                  block: int = 2048):
    """Same contract as `vocab_stats.update_reference`; logits rows must be unit-stride."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if mask is not None and mask.stride(1) != 1:
        mask = mask.contiguous()
    block = min(block, triton.next_power_of_2(v))
    dummy = logits
    _vocab_stats_kernel[(n,)](
        logits, logits.stride(0), v, v0, temp.float().contiguous(), seeds.contiguous(), pos.contiguous(),
        mask.view(torch.uint8) if mask is not None else dummy, mask.stride(0) if mask is not None else 0,
        proc_out if proc_out is not None else dummy, proc_out.stride(0) if proc_out is not None else 0,
        st.m, st.l, st.t, st.best, st.best_id, st.gbest, st.gbest_id,
        HAS_MASK=mask is not None, WRITE_PROC=proc_out is not None, STREAM=STREAM_GUMBEL, BLOCK=block)
