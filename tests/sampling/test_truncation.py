"""top_k / top_p / min_p: the keep mask against a per-position brute force, both sampling steps honour it
(samples inside the cut, distributed as the renormalised softmax, entropies of the cut distribution),
rows that cut nothing are untouched, and the cut reaches LLM.generate and the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canvaslm.config import ConfigError, DiffusionParams
from canvaslm.sampling.fused import fused_entropy_bound_step
from canvaslm.sampling.samplers import (CanvasState, SamplerParams, entropy_bound_accept, entropy_bound_step,
                                        token_entropy)
from canvaslm.sampling.schedules import linear_temperature
from canvaslm.sampling.stopping import new_history
from canvaslm.sampling import truncation
from canvaslm.sampling.truncation import Truncation, keep_mask


def _brute(x: np.ndarray, k: int, p: float, min_p: float) -> np.ndarray:
    """The cut of one position, from its definition. x: scaled logits [V] (-inf = not allowed)."""
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep = np.isfinite(x)
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    if k > 0:
        order = np.argsort(-x, kind="stable")
        keep &= np.isin(np.arange(len(x)), order[:k])
    if p < 1:
        q = np.where(keep, probs, 0.0)
        q /= q.sum()
        order = np.argsort(-q, kind="stable")
        cum, kept = 0.0, np.zeros_like(keep)
        for i in order:
            kept[i] = True
            cum += q[i]
            if cum >= p:
                break
        keep &= kept
    return keep


def _rows(*cuts):
    return [DiffusionParams(max_denoising_steps=4, entropy_bound=2.0, top_k=k, top_p=p, min_p=m) for k, p, m in cuts]


CUTS = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.05), (20, 0.8, 0.0), (3, 0.5, 0.01), (0, 0.0, 0.0)]


@pytest.mark.parametrize("candidates", [1024, 32, 4])  # 32, 4: some or most nuclei are larger: rows sorted whole
@pytest.mark.parametrize("with_mask", [False, True])
def test_keep_mask_matches_a_brute_force_per_position(with_mask, candidates, monkeypatch):
    monkeypatch.setattr(truncation, "CANDIDATES", candidates)
    B, C, V = len(CUTS), 6, 300
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, V, generator=g) * 3
    mask = torch.rand(B, C, V, generator=g) > 0.3 if with_mask else None
    temp = torch.tensor([0.5, 0.8, 1.0, 0.7, 1.3, 0.9, 1.0])
    cut = Truncation.build(_rows(*CUTS), "cpu")
    assert cut.rows == tuple(range(1, B)) and cut.k_max == 20
    keep = keep_mask(logits, temp, cut, mask)
    for b, (k, p, m) in enumerate(CUTS):
        for c in range(C):
            x = (logits[b, c].double() / temp[b]).numpy()
            if mask is not None:
                x = np.where(mask[b, c].numpy(), x, -np.inf)
            want = _brute(x, k, p, m)
            assert np.array_equal(keep[b, c].numpy(), want), (b, c, k, p, m)
            assert want[np.argmax(x)]  # the most likely token always survives
    assert keep[0].sum() == (V * C if mask is None else mask[0].sum())  # a row that cuts nothing is untouched


def test_nothing_to_cut_builds_nothing():
    assert SamplerParams.build(_rows((0, 1.0, 0.0), (0, 1.0, 0.0)), "cpu").truncation is None


@pytest.mark.parametrize("field,value", [("top_k", -1), ("top_k", 2.5), ("top_p", 1.5), ("min_p", 1.5), ("min_p", -0.1)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        DiffusionParams(**{field: value})


def _state(rows, C, V, seed=0):
    p = SamplerParams.build(rows, "cpu")
    B = len(rows)
    canvas = torch.randint(0, V, (B, C), generator=torch.Generator().manual_seed(seed))
    st = CanvasState(canvas, canvas, None, torch.zeros(B, dtype=torch.bool), new_history(B, 1, C, "cpu"),
                     p.n_steps.clone())
    return st, p


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_steps_sample_inside_the_cut_and_rank_the_cut_entropies(impl):
    B, C, V = len(CUTS), 8, 200
    logits = torch.randn(B, C, V, generator=torch.Generator().manual_seed(1)) * 3
    st, p = _state(_rows(*CUTS), C, V)
    temp = linear_temperature(st.cur_step, p.n_steps, p.t_min, p.t_span)
    keep = keep_mask(logits, temp, p.truncation)
    if impl == "fused":
        out = fused_entropy_bound_step(logits, st, p, torch.arange(B) + 3, V, chunk=64)
    else:
        out = entropy_bound_step(logits, st, p, torch.Generator().manual_seed(2), V, impl="reference")
    proc = (logits / temp[:, None, None]).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(out.sc_logits, proc.to(out.sc_logits.dtype))  # self-conditioning sees the cut
    assert torch.equal(out.argmax, logits.argmax(-1))  # the argmax survives every cut
    accepted = out.canvas != st.canvas  # (a kept noise token equal to the old one is vanishingly rare)
    sampled = out.canvas.clamp(max=V - 1)
    inside = keep.gather(2, sampled[..., None])[..., 0]
    # every accepted position sampled inside its cut; top_k=3 / top_p=0 rows accept more (lower entropy)
    acc = entropy_bound_accept(token_entropy(proc), p.entropy_bound)
    assert inside[acc].all() and acc[6].all() and accepted[acc].float().mean() > 0.9
    assert acc[0].sum() < acc[5].sum()


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_samples_follow_the_renormalised_cut_distribution(impl):
    V, C, draws = 12, 64, 40
    logits = torch.linspace(2.0, -2.0, V).repeat(1, C, 1)  # one distribution, many positions
    rows = [DiffusionParams(max_denoising_steps=1, t_min=0.0, t_max=1.0, entropy_bound=1e6, top_p=0.7)]
    counts = np.zeros(V)
    for d in range(draws):
        st, p = _state(rows, C, V, seed=d)
        if impl == "fused":
            out = fused_entropy_bound_step(logits, st, p, torch.tensor([d]), V, chunk=5)
        else:
            out = entropy_bound_step(logits, st, p, torch.Generator().manual_seed(d), V, impl="reference")
        counts += np.bincount(out.canvas.view(-1).numpy(), minlength=V)
    probs = torch.softmax(logits[0, 0], -1).double().numpy()  # temperature 1 at the only step
    n_keep = int(np.searchsorted(np.cumsum(probs), 0.7) + 1)
    want = probs[:n_keep] / probs[:n_keep].sum()
    assert counts[n_keep:].sum() == 0
    n = counts.sum()
    chi2 = (((counts[:n_keep] - n * want) ** 2) / (n * want)).sum()
    assert chi2 < 30, (chi2, counts, want * n)  # n_keep - 1 degrees of freedom: far below the cut at 1e-4


def test_generate_samples_stay_inside_top_k(tiny_llm):
    """top_k=1 leaves one token per position: every entropy is 0, so every position is accepted at the
    first step with its argmax and the draft is the canvas."""
    from canvaslm import SamplingParams
    from canvaslm.generate import generate_rows

    def drafts(**kw):
        seen = []
        rows = tiny_llm.rows([[5, 6, 7, 8]], [SamplingParams(max_new_tokens=32, seed=3, **kw)])
        generate_rows(tiny_llm.model, rows, [torch.Generator().manual_seed(3)],
                      on_draft=lambda k, st: seen.append(torch.equal(st.canvas, st.argmax)))
        return seen

    cut = drafts(top_k=1)
    assert cut and all(cut)
    assert not drafts()[0]  # without the cut the first step renoises positions
