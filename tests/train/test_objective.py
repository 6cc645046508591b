"""The block-diffusion objective: batching, noise statistics, causality across canvases, self-conditioning,
a hand-written reference computation, and the AR baseline helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from canvaslm.checkpoint import build_random_model, load_model
from canvaslm.kv_cache import KVCache
from canvaslm.shapes import model_config
from canvaslm.testing import make_tiny_checkpoint
from canvaslm.train.objective import (T_EPS, NoiseDraw, block_diffusion_loss, draw_noise, example_noise_seed,
                                      greedy_ar_generate, make_batch, set_trainable, token_ce)

from .helpers import SMALL

EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint with canvas 8 and sliding window 16 (shorter than the training sequences)."""
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", canvas_length=8, std=0.2)
    return load_model(d)


def _examples():
    return [(list(range(10, 20)), list(range(30, 50))),  # 20 + EOS -> 3 canvases
            ([7, 8, 9], [40, 41, 42]),  # 1 canvas
            ([11], list(range(50, 66)) + [EOS])]  # exactly 17 -> 3 canvases (EOS opens the 3rd)


def test_make_batch_layout():
    b = make_batch(_examples(), canvas_length=8, pad_id=PAD, eos_id=EOS)
    assert b.num_canvases.tolist() == [3, 1, 3]
    assert b.prompt_lens.tolist() == [10, 3, 1]
    assert b.tokens.shape == (3, 34)
    row0 = b.tokens[0].tolist()
    assert row0[10:30] == list(range(30, 50)) and row0[30:34] == [EOS] * 4
    row1 = b.tokens[1].tolist()
    assert row1[:11] == [7, 8, 9, 40, 41, 42] + [EOS] * 5 and set(row1[11:]) == {PAD}
    assert (b.positions[1, 11:] == -1).all() and b.positions[1, :11].tolist() == list(range(11))
    # a response that already ends with EOS gets no second one; exact fill -> one EOS canvas
    exact = make_batch([([5], [40] * 7 + [EOS])], 8, PAD, EOS)
    assert exact.num_canvases.tolist() == [1] and exact.tokens[0, -1] == EOS
    full = make_batch([([5], [40] * 8)], 8, PAD, EOS)
    assert full.num_canvases.tolist() == [2] and full.tokens[0, 9:].tolist() == [EOS] * 8
    with pytest.raises(ValueError, match="empty prompt"):
        make_batch([([], [1])], 8, PAD, EOS)


def test_corruption_rate_matches_t():
    B, C, V = 3000, 64, 100
    b = make_batch([([5], [6] * C)] * B, C, PAD, EOS)
    nd = draw_noise(b, torch.Generator().manual_seed(0), V, sc_prob=0.5)
    assert float(nd.t.min()) >= T_EPS and float(nd.t.max()) <= 1 - T_EPS
    frac = nd.replace.float().mean(1)
    # E[frac | t] = t: residuals are centred and small, the slope is ~1
    resid = frac - nd.t
    assert abs(float(resid.mean())) < 0.005
    slope = float(((frac - frac.mean()) * (nd.t - nd.t.mean())).sum() / ((nd.t - nd.t.mean()) ** 2).sum())
    assert abs(slope - 1) < 0.03
    assert abs(float(nd.t.mean()) - 0.5) < 0.02  # t ~ U[0, 1]
    # canvases chosen uniformly among the valid ones; random tokens uniform over the vocabulary
    b3 = make_batch([([5], [6] * (3 * C - 1))] * B, C, PAD, EOS)
    nd3 = draw_noise(b3, torch.Generator().manual_seed(1), V, 0.5)
    counts = torch.bincount(nd3.canvas_index, minlength=3).float() / B
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.03)
    hist = torch.bincount(nd.random_tokens.flatten(), minlength=V).float()
    assert hist.min() > 0.8 * hist.mean() and hist.max() < 1.2 * hist.mean()


def test_noisy_canvas_follows_the_draws(tiny):
    b = make_batch(_examples(), 8, PAD, EOS)
    out = block_diffusion_loss(tiny, b, torch.Generator().manual_seed(3))
    nd = draw_noise(b, torch.Generator().manual_seed(3), tiny.cfg.vocab_size, 0.5)
    for r in range(3):
        start = int(b.prompt_lens[r]) + 8 * int(out.canvas_index[r])
        clean = b.tokens[r, start:start + 8]
        assert torch.equal(out.noisy_canvas[r], torch.where(nd.replace[r], nd.random_tokens[r], clean))


def _fixed_noise(b, canvas_index, sc_taken, seed=0, t=0.5, V=100):
    g = torch.Generator().manual_seed(seed)
    B, C = b.batch_size, b.canvas_length
    return NoiseDraw(t=torch.full((B,), t), canvas_index=torch.tensor(canvas_index),
                     replace=torch.rand(B, C, generator=g) < t, random_tokens=torch.randint(0, V, (B, C), generator=g),
                     sc_taken=torch.tensor(sc_taken))


@pytest.mark.parametrize("sc", [False, True])
def test_later_canvases_do_not_reach_the_loss(tiny, sc):
    b = make_batch(_examples(), 8, PAD, EOS)
    noise = _fixed_noise(b, [0, 0, 1], [sc, sc, sc])
    perturbed = b.tokens.clone()
    perturbed[0, 18:34] = torch.randint(5, 100, (16,))  # canvases 1, 2 of row 0
    perturbed[2, 17:25] = torch.randint(5, 100, (8,))  # canvas 2 of row 2
    b2 = type(b)(perturbed, b.positions, b.prompt_lens, b.num_canvases, b.canvas_length)
    a = block_diffusion_loss(tiny, b, None, ar_weight=0.0, noise=noise)
    c = block_diffusion_loss(tiny, b2, None, ar_weight=0.0, noise=noise)
    assert torch.equal(a.per_example_diffusion, c.per_example_diffusion)
    assert torch.equal(a.loss, c.loss)
    full_a = block_diffusion_loss(tiny, b, None, noise=noise)
    full_c = block_diffusion_loss(tiny, b2, None, noise=noise)
    assert torch.equal(full_a.diffusion_loss, full_c.diffusion_loss)
    assert not torch.equal(full_a.ar_loss, full_c.ar_loss)  # the AR term does see them (it is separate)
    # sanity: an *earlier* canvas does reach the loss of a later selected canvas
    earlier = b.tokens.clone()
    earlier[2, 1:9] = torch.randint(5, 100, (8,))
    b3 = type(b)(earlier, b.positions, b.prompt_lens, b.num_canvases, b.canvas_length)
    d = block_diffusion_loss(tiny, b3, None, ar_weight=0.0, noise=noise)
    assert not torch.equal(a.per_example_diffusion[2], d.per_example_diffusion[2])


def test_self_conditioning_rate_and_effect(tiny):
    b = make_batch([([5], [6] * 8)] * 4000, 8, PAD, EOS)
    for p in (0.0, 0.3, 0.5, 1.0):
        taken = draw_noise(b, torch.Generator().manual_seed(7), 100, sc_prob=p).sc_taken.float().mean()
        assert abs(float(taken) - p) < 0.025
    small = make_batch(_examples(), 8, PAD, EOS)
    on = block_diffusion_loss(tiny, small, None, ar_weight=0.0, noise=_fixed_noise(small, [1, 0, 2], [True] * 3))
    off = block_diffusion_loss(tiny, small, None, ar_weight=0.0, noise=_fixed_noise(small, [1, 0, 2], [False] * 3))
    assert not torch.allclose(on.per_example_diffusion, off.per_example_diffusion)


def _reference_loss(model, b, noise, sc_passes=1):
    """Hand-written: per example, a fresh inference-style cache (sliding ring) holding only the prompt and
    the canvases before the selected one; denoise twice with SC; AR loss via a cache-free encoder pass."""
    C, diff, ar = b.canvas_length, [], []
    for r in range(b.batch_size):
        n = int((b.positions[r] >= 0).sum())
        row = b.tokens[r, :n]
        start = int(b.prompt_lens[r]) + C * int(noise.canvas_index[r])
        clean = row[start:start + C]
        noisy = torch.where(noise.replace[r], noise.random_tokens[r], clean)[None]
        cache = KVCache(model.cfg, 1, n)
        slot = torch.zeros(1, dtype=torch.long)
        model.encode(row[None, :start], torch.arange(start)[None], slot, cache)
        with torch.no_grad():
            first = model.denoise(noisy, slot, cache)
            for _ in range(sc_passes - 1):
                first = model.denoise(noisy, slot, cache, sc_logits=first)
        sc = first if bool(noise.sc_taken[r]) else None
        logits = model.denoise(noisy, slot, cache, sc_logits=sc)
        diff.append(F.cross_entropy(logits[0], clean))
        h = model.encode(row[None], torch.arange(n)[None], slot, None)
        ar.append(F.cross_entropy(model.logits(h[0, :-1]), row[1:]))
    return torch.stack(diff).mean(), torch.stack(ar).mean()


def test_loss_matches_direct_computation(tiny):
    b = make_batch(_examples(), 8, PAD, EOS)
    for seed in range(2):
        out = block_diffusion_loss(tiny, b, torch.Generator().manual_seed(seed), sc_prob=0.5)
        noise = draw_noise(b, torch.Generator().manual_seed(seed), tiny.cfg.vocab_size, 0.5)
        d_ref, a_ref = _reference_loss(tiny, b, noise)
        torch.testing.assert_close(out.diffusion_loss, d_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.ar_loss, a_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, d_ref + a_ref, rtol=1e-5, atol=1e-5)
    w = block_diffusion_loss(tiny, b, torch.Generator().manual_seed(0), diffusion_weight=0.5, ar_weight=2.0)
    torch.testing.assert_close(w.loss, 0.5 * w.diffusion_loss + 2.0 * w.ar_loss)
    chained = block_diffusion_loss(tiny, b, torch.Generator().manual_seed(1), sc_prob=0.5, sc_passes=3)
    d3, _ = _reference_loss(tiny, b, noise, sc_passes=3)  # noise: seed 1's draws, from the loop above
    torch.testing.assert_close(chained.diffusion_loss, d3, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d3, d_ref)  # the chain changes what the loss pass conditions on
    with pytest.raises(ValueError, match="sc_passes"):
        block_diffusion_loss(tiny, b, torch.Generator().manual_seed(1), sc_passes=0)
    ar = block_diffusion_loss(tiny, b, None, ar_only=True)
    torch.testing.assert_close(ar.loss, a_ref)
    assert float(ar.diffusion_loss) == 0.0


def test_noise_seeds_make_draws_batch_invariant():
    ex = _examples()
    seeds = [example_noise_seed(1, 5, i) for i in range(3)]
    assert len(set(seeds)) == 3 and seeds[0] == example_noise_seed(1, 5, 0) != example_noise_seed(1, 6, 0)
    full = draw_noise(make_batch(ex, 8, PAD, EOS, noise_seeds=seeds), None, 100, 0.5)
    part = draw_noise(make_batch(ex[1:], 8, PAD, EOS, noise_seeds=seeds[1:]), None, 100, 0.5)
    for f in ("t", "canvas_index", "replace", "random_tokens", "sc_taken"):
        assert torch.equal(getattr(full, f)[1:], getattr(part, f)), f


def test_router_frozen_and_gradients_flow_through_cache(tiny):
    frozen = set_trainable(tiny)
    assert frozen and all(".router." in n for n in frozen)
    b = make_batch(_examples(), 8, PAD, EOS)
    tiny.zero_grad()
    # canvas 1 of row 0: its loss depends on the prompt/canvas-0 K/V, so embeddings of those tokens get grads
    block_diffusion_loss(tiny, b, None, ar_weight=0.0, noise=_fixed_noise(b, [1, 0, 0], [False] * 3)).loss.backward()
    grad = tiny.embed_weight.grad
    assert grad[10:20].abs().sum() > 0  # prompt-only tokens of row 0 (ids 10..19)
    assert all(p.grad is None for n, p in tiny.named_parameters() if ".router." in n)
    tiny.zero_grad()
    set_trainable(tiny, freeze_router=False)


def test_from_scratch_loss_falls():
    torch.manual_seed(0)
    cfg = model_config("tiny", canvas_length=8, vocab_size=32, **SMALL)
    model = build_random_model(cfg, std=0.02)
    set_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses = []
    for _ in range(25):
        ex = []
        for _ in range(8):
            p = torch.randint(5, 32, (6,), generator=data).tolist()
            ex.append(([2] + p, p[::-1]))  # reverse the prompt
        out = block_diffusion_loss(model, make_batch(ex, 8, PAD, EOS), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.diffusion_loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)


def test_greedy_ar_generate_matches_full_recompute(tiny):
    prompts = [[2, 10, 11, 12], [2, 40]]
    batched = greedy_ar_generate(tiny, prompts, 6, eos_ids=[EOS, 4])
    assert greedy_ar_generate(tiny, [], 6, eos_ids=[EOS]) == []  # no prompts (was max() of an empty sequence)
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_ar_generate(tiny, [[]], 6, eos_ids=[EOS])
    for p, out in zip(prompts, batched):
        assert greedy_ar_generate(tiny, p, 6, eos_ids=[EOS, 4]) == out
        seq = list(p)
        ref = []
        for _ in range(6):  # no cache: re-encode the whole sequence each step
            h = tiny.encode(torch.tensor([seq]), torch.arange(len(seq))[None], torch.zeros(1, dtype=torch.long), None)
            tok = int(tiny.logits(h[0, -1]).argmax())
            ref.append(tok)
            seq.append(tok)
            if tok in (EOS, 4):
                break
        assert out == ref


@pytest.mark.slow
def test_trained_model_copies_through_the_inference_loop():
    """Train from scratch on copying 5 tokens (two canvases of 4: x1..x4 | x5, EOS, fill), then generate
    with the inference sampler: the objective and the generation loop agree on positions and canvases."""
    import random

    from canvaslm.config import DiffusionParams
    from canvaslm.generate import RowRequest, generate_rows

    cfg = model_config("tiny", canvas_length=4, vocab_size=16, **SMALL)
    torch.manual_seed(0)
    model = build_random_model(cfg, std=0.02)
    set_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # 150 steps: at 100 some seeds (seed 0 on torch 2.13) still sit on a plateau at loss ~0.5;
    # at 150 seeds 0-7 all reach loss < 0.01 and copy every held-out example.
    g, rng, steps = torch.Generator().manual_seed(0), random.Random(0), 150

    def examples(n):
        return [([2] + p + [3], p) for p in ([rng.randint(5, 15) for _ in range(5)] for _ in range(n))]

    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * min(1, (s + 1) / 10) * (0.1 + 0.9 * (1 - s / steps))
        out = block_diffusion_loss(model, make_batch(examples(32), 4, PAD, EOS), g, ar_weight=0.0)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    held_out = examples(32)
    rows = [RowRequest(p, DiffusionParams(max_new_tokens=8, max_denoising_steps=4), (EOS,), PAD) for p, _ in held_out]
    res = generate_rows(model.eval(), rows, torch.Generator().manual_seed(0))
    exact = sum(r.token_ids == resp + [EOS] for r, (_, resp) in zip(res, held_out)) / len(held_out)
    assert exact >= 0.9, exact


def test_chunked_cross_entropy_equals_the_whole_and_keeps_less(tiny):
    """Both cross-entropies go through token_ce, which never holds a whole [tokens, vocab] logits tensor
    for the backward: chunked and unchunked give the same loss and gradients, and autograd keeps less."""
    from canvaslm.train.trainer import kept_for_backward

    b = make_batch(_examples(), 8, PAD, EOS)
    noise = _fixed_noise(b, [1, 0, 2], [True, False, True])
    runs = {}
    for rows in (0, 5, None):
        tiny.zero_grad(set_to_none=True)
        for p in tiny.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            out, kept = kept_for_backward(tiny, lambda: block_diffusion_loss(tiny, b, None, noise=noise,
                                                                             ce_rows_per_chunk=rows))
            out.loss.backward()
        runs[rows] = out, kept, {n: p.grad.clone() for n, p in tiny.named_parameters()}
        for p in tiny.parameters():
            p.requires_grad_(False)
    whole, kept_whole, g_whole = runs[0]
    for rows in (5, None):
        out, kept, g = runs[rows]
        torch.testing.assert_close(out.loss, whole.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.ar_loss, whole.ar_loss, rtol=1e-6, atol=1e-6)
        for n in g_whole:
            torch.testing.assert_close(g[n], g_whole[n], rtol=1e-5, atol=1e-6, msg=n)
    assert runs[5][1] < kept_whole  # chunks of 5 rows: no [tokens, vocab] logits kept
    ids = torch.randint(0, tiny.cfg.vocab_size, (2, 7))
    h = torch.randn(2, 7, tiny.cfg.hidden_size)
    want = F.cross_entropy(tiny.logits(h).transpose(1, 2), ids, reduction="none")
    torch.testing.assert_close(token_ce(tiny, h, ids, rows_per_chunk=3), want)
