"""The inverse-CDF draw (samplers.inverse_cdf / categorical_cdf, what `impl="auto"` runs off CUDA): samples
follow the distribution (chi-square), never an id of probability 0, whatever the block size; one generator
draw per position, so a request's samples do not depend on its batch mates; and the step around it is the
reference step in everything but the draws (same argmax, entropies and acceptance)."""

from __future__ import annotations

import pytest
import torch

from canvaslm.config import DiffusionParams
from canvaslm.sampling.samplers import (SAMPLER_IMPLS, CanvasState, SamplerParams, categorical, categorical_cdf,
                                        entropy_bound_step, inverse_cdf)
from canvaslm.sampling.stopping import new_history

def chi_square(ids, probs, n):
    counts = torch.bincount(ids, minlength=len(probs)).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "an id of probability 0 was drawn"
    expected = probs[keep].double() * n
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("block", [1, 3, 8, 1024])
def test_draws_follow_the_distribution_and_skip_zeros(block):
    probs = torch.tensor([0.0, 0.25, 0.0, 0.05, 0.4, 0.0, 0.2, 0.1])
    n = 40_000
    g = torch.Generator().manual_seed(block)
    ids = inverse_cdf(probs.expand(n, -1).contiguous(), torch.rand(n, generator=g, dtype=torch.float64), block)
    chi2, dof = chi_square(ids, probs, n)
    assert dof == 4 and chi2 < 18.47, f"chi-square {chi2:.1f} over the p=0.001 critical value for 4 degrees of freedom"


def test_edges_of_the_unit_interval_and_unnormalised_rows():
    probs = torch.tensor([[0.0, 0.0, 3.0, 0.0, 1.0, 0.0, 0.0]] * 3)  # a total of 4, zeros at both ends
    u = torch.tensor([0.0, 0.75 - 1e-12, 1.0 - 2**-53], dtype=torch.float64)
    for block in (1, 2, 4, 16):
        assert inverse_cdf(probs, u, block).tolist() == [2, 2, 4]


def test_the_last_block_may_be_partial_and_a_large_vocabulary_stays_exact():
    V = 262_144 + 5  # DiffusionGemma's vocabulary and a ragged tail
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, V, generator=g) * 3, -1)
    probs[:, -3:] = 0
    probs[0] = 0
    probs[0, V - 4] = 1.0  # all the mass in the tail block
    u = torch.rand(4, generator=g, dtype=torch.float64)
    got = inverse_cdf(probs, u)
    cum = probs.double().cumsum(-1)
    want = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True).squeeze(1)
    assert got[0] == V - 4 and torch.equal(got, want)


def test_one_draw_per_position_and_rows_independent_of_their_batch():
    B, C, V = 3, 16, 700
    probs = torch.softmax(torch.randn(B, C, V, generator=torch.Generator().manual_seed(1)) * 2, -1)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    full = categorical_cdf(probs, gens)
    alone = categorical_cdf(probs[1:2], [torch.Generator().manual_seed(6)])
    assert torch.equal(full[1:2], alone)
    g = torch.Generator().manual_seed(5)
    g.manual_seed(5)
    torch.rand(C, generator=g, dtype=torch.float64)  # a row's draw moves its generator by C doubles, no more
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=gens[0]))
    idle = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    part = categorical_cdf(probs, idle, active=torch.tensor([True, False, True]))
    assert torch.equal(part[[0, 2]], full[[0, 2]])
    assert torch.equal(torch.rand(2, generator=idle[1]), torch.rand(2, generator=torch.Generator().manual_seed(6)))
    shared = categorical_cdf(probs, torch.Generator().manual_seed(9))  # one generator: B * C draws in a row
    assert shared.shape == (B, C)


def _state(B, C, V, steps=4):
    p = SamplerParams.build([DiffusionParams(max_denoising_steps=steps, entropy_bound=2.0)] * B, "cpu")
    canvas = torch.randint(0, V, (B, C), generator=torch.Generator().manual_seed(0))
    return CanvasState(canvas, canvas, None, torch.zeros(B, dtype=torch.bool), new_history(B, 1, C, "cpu"),
                       p.n_steps.clone()), p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_is_the_reference_step_but_for_its_draws(dtype):
    B, C, V = 2, 32, 400
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(B, C, V, generator=g) * 4).to(dtype)
    mask = torch.rand(B, C, V, generator=g) > 0.3
    st, p = _state(B, C, V)
    ref = entropy_bound_step(logits, st, p, [torch.Generator().manual_seed(s) for s in (1, 2)], V, logit_mask=mask,
                             impl="reference")
    cdf = entropy_bound_step(logits, st, p, [torch.Generator().manual_seed(s) for s in (1, 2)], V, logit_mask=mask,
                             impl="cdf")
    auto = entropy_bound_step(logits, st, p, [torch.Generator().manual_seed(s) for s in (1, 2)], V, logit_mask=mask)
    assert torch.equal(cdf.canvas, auto.canvas)  # auto on a CPU: the inverse-CDF draw
    assert torch.equal(ref.argmax, cdf.argmax) and torch.equal(ref.finished, cdf.finished)
    torch.testing.assert_close(ref.sc_logits, cdf.sc_logits)
    assert (cdf.canvas != ref.canvas).any()  # the draws differ (each generator moved its own way)
    sharp = logits.float() * 50  # every position confident: all accepted, so the canvas is the samples
    every = entropy_bound_step(sharp, st, p, [torch.Generator().manual_seed(s) for s in (1, 2)], V, logit_mask=mask,
                               impl="cdf")
    assert torch.equal(every.canvas, every.argmax)  # near one-hot rows: the sample is the allowed argmax
    assert mask.gather(2, every.canvas[..., None]).all()
    with pytest.raises(ValueError, match="sampler impl 'exact'"):
        entropy_bound_step(logits, st, p, torch.Generator(), V, impl="exact")
    assert SAMPLER_IMPLS == ("auto", "reference", "cdf", "fused")


def test_the_reference_draw_still_matches_torch_multinomial():
    probs = torch.softmax(torch.randn(2, 4, 50), -1)
    a = categorical(probs, torch.Generator().manual_seed(3))
    b = torch.multinomial(probs.view(-1, 50), 1, generator=torch.Generator().manual_seed(3)).view(2, 4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_probabilities_and_entropy_match_the_reference_formulas(dtype):
    from canvaslm.sampling.samplers import probs_and_entropy, token_entropy

    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(2, 16, 300, generator=g) * 6).to(dtype)
    logits = logits.masked_fill(torch.rand(2, 16, 300, generator=g) > 0.6, float("-inf"))
    logits[0, 0] = float("-inf")
    logits[0, 0, 5] = 3.0  # one allowed id: entropy 0, probability 1
    probs, entropy = probs_and_entropy(logits)
    assert probs.dtype == entropy.dtype == torch.float32 and torch.isfinite(entropy).all()
    torch.testing.assert_close(probs, torch.softmax(logits, -1, dtype=torch.float32), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(entropy, token_entropy(logits.float()), atol=1e-5, rtol=1e-5)
    assert entropy[0, 0] == 0 and probs[0, 0, 5] == 1 and (probs[logits == float("-inf")] == 0).all()
