"""The fused sampler's Gumbel noise is the inverse CDF of all 32 random bits, its tail included, and the
Triton kernel computes the very same noise."""

from __future__ import annotations

import math

import torch

from canvaslm.kernels import philox as ph
from canvaslm.kernels import vocab_stats as vs


def test_gumbel_is_the_inverse_cdf_of_the_whole_word():
    """g decreases with the word x, so P(G >= g(x)) must be (x + 0.5) / 2**32 for every x: down to the
    smallest word (g near 22.9, where 23 bits stopped at 16.6) and up to the largest (finite, no -inf)."""
    words = [0, 1, 7, 300, 2**12, 2**20, 2**25, 2**28, 2**31, 2**32 - 2**24, 2**32 - 1]
    g = ph.gumbel(torch.tensor(words, dtype=torch.long))
    assert torch.isfinite(g).all() and (g[1:] < g[:-1]).all()
    assert g[0] > 22
    for x, gx in zip(words[:-2], g.tolist()):  # the left tail (v near 1) is cut at 1 - 2**-24: P < 1e-7
        tail = -math.expm1(-math.exp(-gx))  # P(G >= gx) of a standard Gumbel
        assert math.isclose(tail, (x + 0.5) / 2**32, rel_tol=2e-4), (x, gx)


def test_triton_gumbel_matches_the_reference(triton_device):
    """Spread logits (the winner is often far from the smallest word) and flat ones (it is the smallest):
    the kernel's Gumbel-max value and id equal the reference's."""
    from canvaslm.kernels.vocab_stats_triton import update_triton

    gen = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, ph.SEED_HIGH, (6,), generator=gen)
    pos, temp = torch.arange(6), torch.ones(6)
    for x in (torch.randn(6, 3000, generator=gen) * 4, torch.zeros(6, 3000)):
        x, t, s, p = (v.to(triton_device) for v in (x, temp, seeds, pos))
        ref = vs.stats_over_vocab(x, t, s, p, None, chunk=1024, impl="reference")
        tri = vs.VocabStats.new(6, triton_device)
        update_triton(tri, x, 0, t, s, p, None, None, block=512)
        assert torch.equal(tri.gbest_id, ref.gbest_id)
        torch.testing.assert_close(tri.gbest, ref.gbest, rtol=1e-6, atol=1e-6)
