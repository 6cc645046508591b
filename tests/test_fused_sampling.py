"""The fused sampling step against the reference sampler: same entropies, argmaxes and acceptance, samples
distributed as softmax(logits / T), per-request reproducibility, and memory that does not scale with a
float32 [B, C, V] copy."""

from __future__ import annotations

import pytest
import torch

from canvaslm.checkpoint import build_random_model
from canvaslm.config import DiffusionParams
from canvaslm.kernels import philox as ph
from canvaslm.kv_cache import KVCache
from canvaslm.sampling.fused import fused_entropy_bound_step, fused_step_from_hidden
from canvaslm.sampling.samplers import (CanvasState, SamplerParams, entropy_bound_accept, entropy_bound_step,
                                        token_entropy)
from canvaslm.sampling.schedules import linear_temperature
from canvaslm.sampling.stopping import new_history
from canvaslm.shapes import model_config
from tests.kernels.conftest import cpu_peak_bytes


def _state(B, C, V, steps=4, seed=0, **kw):
    params = [DiffusionParams(max_denoising_steps=steps, **kw)] * B
    p = SamplerParams.build(params, "cpu")
    canvas = torch.randint(0, V, (B, C), generator=torch.Generator().manual_seed(seed))
    st = CanvasState(canvas, canvas, None, torch.zeros(B, dtype=torch.bool), new_history(B, 1, C, "cpu"),
                     p.n_steps.clone())
    return st, p


def _proc(logits, st, p, mask=None):
    temp = linear_temperature(st.cur_step, p.n_steps, p.t_min, p.t_span)
    proc = logits / temp[:, None, None]
    return proc if mask is None else proc.masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("with_mask", [False, True])
def test_entropy_argmax_acceptance_match_reference(with_mask):
    B, C, V = 3, 16, 500
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, V, generator=g) * 4
    mask = torch.rand(B, C, V, generator=g) > 0.5 if with_mask else None
    st, p = _state(B, C, V, entropy_bound=2.0)
    seeds = torch.tensor([5, 6, 7])
    out = fused_entropy_bound_step(logits, st, p, seeds, V, logit_mask=mask, chunk=128)
    proc = _proc(logits, st, p, mask)
    ref_entropy = token_entropy(proc)
    torch.testing.assert_close(out.sc_logits, proc)  # the processed logits, written in the same pass
    assert torch.equal(out.argmax, proc.argmax(-1))
    accept = entropy_bound_accept(ref_entropy, p.entropy_bound)
    assert accept.any() and (~accept).any()
    noise = ph.philox(seeds[:, None], torch.arange(C)[None], 0, ph.STREAM_NOISE, 0) % V
    assert torch.equal(out.canvas[~accept], noise[~accept])
    accepted = out.canvas[accept]
    if mask is not None:  # an accepted sample is always an allowed token
        assert mask[accept].gather(1, accepted[:, None]).all()
    # the reference sampler, same logits: same argmax, same acceptance pattern (its samples differ)
    ref = entropy_bound_step(logits, st, p, torch.Generator().manual_seed(0), V, logit_mask=mask, impl="reference")
    assert torch.equal(ref.argmax, out.argmax) and torch.equal(ref.finished, out.finished)


def test_dispatch_from_entropy_bound_step():
    B, C, V = 2, 8, 64
    logits = torch.randn(B, C, V)
    st, p = _state(B, C, V)
    a = entropy_bound_step(logits, st, p, torch.tensor([1, 2]), V, impl="fused")
    b = fused_entropy_bound_step(logits, st, p, torch.tensor([1, 2]), V)
    assert torch.equal(a.canvas, b.canvas)


def test_samples_follow_softmax_chi_square():
    V, n = 8, 40_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    temp = 0.7
    rows = logits.expand(n, V)
    from canvaslm.kernels.vocab_stats import stats_over_vocab

    st = stats_over_vocab(rows, torch.full((n,), temp), torch.full((n,), 99, dtype=torch.long), torch.arange(n),
                          chunk=3, impl="reference")
    counts = torch.bincount(st.gbest_id, minlength=V).double()
    expected = torch.softmax(logits.double() / temp, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, f"chi-square {chi2:.1f} over the p=0.001 critical value for 7 degrees of freedom"


def test_per_request_reproducible_and_batch_independent():
    C, V = 8, 300
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, C, V, generator=g) * 2
    st, p = _state(3, C, V)
    seeds = torch.tensor([11, 12, 13])
    full = fused_entropy_bound_step(logits, st, p, seeds, V, chunk=64)
    st1, p1 = _state(1, C, V)
    st1.canvas = st.canvas[1:2]
    one = fused_entropy_bound_step(logits[1:2], st1, p1, seeds[1:2], V, chunk=300)
    assert torch.equal(full.canvas[1:2], one.canvas)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    x = fused_entropy_bound_step(logits[[0, 0, 0]], *_state(3, C, V), gens, V)
    assert torch.equal(x.canvas[0], x.canvas[2]) and not torch.equal(x.canvas[0], x.canvas[1])


def test_pinned_positions_are_kept():
    B, C, V = 2, 8, 50
    st, p = _state(B, C, V)
    pinned = torch.full((B, C), -1)
    pinned[:, 2] = 7
    out = fused_entropy_bound_step(torch.randn(B, C, V), st, p, torch.tensor([1, 2]), V, pinned=pinned)
    assert (out.canvas[:, 2] == 7).all() and (out.argmax[:, 2] == 7).all()


def test_memory_does_not_scale_with_fp32_vocab_copies():
    B, C, V = 1, 16, 32768
    logits = torch.randn(B, C, V)
    one_copy = logits.numel() * 4
    st, p = _state(B, C, V)
    ref = cpu_peak_bytes(lambda: entropy_bound_step(logits, st, p, torch.Generator().manual_seed(0), V,
                                                    impl="reference"))
    fused = cpu_peak_bytes(lambda: fused_entropy_bound_step(logits, st, p, torch.tensor([1]), V, write_sc=False,
                                                            chunk=256))
    assert ref > 2 * one_copy  # the reference holds several fp32 [B, C, V] temporaries
    assert fused < one_copy / 4, f"fused step peaked at {fused} bytes; one fp32 [B, C, V] is {one_copy}"


def test_from_hidden_matches_logits_path_and_soft_embeddings():
    cfg = model_config("tiny", canvas_length=8)
    model = build_random_model(cfg, seed=0, std=0.5)
    V, C, B = cfg.vocab_size, 8, 2
    cache = KVCache(cfg, B, 64)
    slots = torch.arange(B)
    pos = torch.arange(10)[None].expand(B, -1)
    model.encode(torch.randint(0, V, (B, 10)), pos, slots, cache)
    st, p = _state(B, C, V)
    hidden = model.denoise(st.canvas, slots, cache, return_hidden=True)
    logits = model.logits(hidden)
    seeds = torch.tensor([3, 4])
    a = fused_entropy_bound_step(logits, st, p, seeds, V)
    b = fused_step_from_hidden(hidden, model, st, p, seeds, V, chunk=100)
    assert torch.equal(a.argmax, b.argmax) and torch.equal(a.canvas, b.canvas)
    assert b.sc_logits is None
    torch.testing.assert_close(b.sc_embeds, model.soft_embeddings(a.sc_logits), rtol=1e-4, atol=1e-4)
    # the next step consumes them: same logits as from sc_logits
    l1 = model.denoise(b.canvas, slots, cache, sc_embeds=b.sc_embeds)
    l2 = model.denoise(a.canvas, slots, cache, sc_logits=a.sc_logits)
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
