"""The streamed vocabulary statistics: PyTorch reference vs plain full-vocabulary maths, and the Triton
kernel vs the reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from canvaslm.kernels import vocab_stats as vs
from canvaslm.sampling.samplers import token_entropy


def _inputs(N=6, V=300, seed=0, masked=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g) * 3).to(dtype)
    temp = torch.rand(N, generator=g) + 0.5
    seeds = torch.randint(0, 2 ** 62, (N,), generator=g)
    pos = torch.arange(N)
    mask = torch.rand(N, V, generator=g) > 0.3 if masked else None
    return x, temp, seeds, pos, mask


@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_full_softmax(masked):
    x, temp, seeds, pos, mask = _inputs(masked=masked)
    proc = x / temp[:, None]
    if mask is not None:
        proc = proc.masked_fill(~mask, float("-inf"))
    out = torch.empty_like(x)
    st = vs.stats_over_vocab(x, temp, seeds, pos, mask, proc_out=out, chunk=37, impl="reference")
    torch.testing.assert_close(st.entropy(), token_entropy(proc[None])[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(st.best_id, proc.argmax(-1))
    torch.testing.assert_close(st.log_normalizer(), proc.logsumexp(-1))
    assert torch.equal(out, proc)
    if mask is not None:
        assert mask.gather(1, st.gbest_id[:, None]).all()  # never samples a masked token


def test_chunk_size_does_not_change_anything():
    x, temp, seeds, pos, mask = _inputs(V=500)
    a = vs.stats_over_vocab(x, temp, seeds, pos, mask, chunk=500, impl="reference")
    b = vs.stats_over_vocab(x, temp, seeds, pos, mask, chunk=64, impl="reference")
    assert torch.equal(a.gbest_id, b.gbest_id) and torch.equal(a.best_id, b.best_id)
    torch.testing.assert_close(a.entropy(), b.entropy())


@pytest.mark.parametrize("masked,dtype,block", [(False, torch.float32, 64), (True, torch.float32, 128),
                                                (True, torch.bfloat16, 512)])
def test_triton_matches_reference(triton_device, masked, dtype, block):
    from canvaslm.kernels.vocab_stats_triton import update_triton

    x, temp, seeds, pos, mask = _inputs(N=5, V=700, masked=masked, dtype=dtype)
    x, temp, seeds, pos = (t.to(triton_device) for t in (x, temp, seeds, pos))
    mask = None if mask is None else mask.to(triton_device)
    ref_out, tri_out = torch.empty(5, 700, device=triton_device), torch.empty(5, 700, device=triton_device)
    ref = vs.stats_over_vocab(x, temp, seeds, pos, mask, proc_out=ref_out, chunk=256, impl="reference")
    tri = vs.VocabStats.new(5, triton_device)
    # two calls on column ranges: the kernel folds into running statistics
    update_triton(tri, x[:, :300], 0, temp, seeds, pos, None if mask is None else mask[:, :300],
                  tri_out[:, :300], block=block)
    update_triton(tri, x[:, 300:], 300, temp, seeds, pos, None if mask is None else mask[:, 300:],
                  tri_out[:, 300:], block=block)
    torch.testing.assert_close(tri.entropy(), ref.entropy(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.log_normalizer(), ref.log_normalizer(), rtol=1e-5, atol=1e-5)
    assert torch.equal(tri.best_id, ref.best_id)
    assert torch.equal(tri.gbest_id, ref.gbest_id)
    assert torch.equal(tri_out, ref_out)
