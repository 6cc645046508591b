"""Philox in PyTorch is bit-identical to Triton's, and its uniforms look uniform."""

from __future__ import annotations

import pytest
import torch

from canvaslm.kernels import philox as ph


def test_uniform_is_open_interval_and_flat():
    seeds = torch.full((1,), 1234, dtype=torch.long)
    bits = ph.philox(seeds, torch.arange(200_000), 7, 0, 0)
    assert bits.min() >= 0 and bits.max() < 2 ** 32
    u = ph.uniform(bits)
    assert 0 < u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005
    other = ph.philox(seeds, torch.arange(200_000), 8, 0, 0)  # another counter word: another stream
    assert (other == bits).float().mean() < 1e-3


def test_draw_seeds_follows_each_generator():
    g = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    s = ph.draw_seeds(g, 3, "cpu")
    assert s[0] == s[2] and s[0] != s[1]
    assert (ph.draw_seeds(torch.Generator().manual_seed(1), 4, "cpu") >= 0).all()


def test_matches_triton_philox(triton_device):
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(seed_ptr, out, n, c1, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr)
        c0 = offs.to(tl.uint32)
        zero = c0 * 0
        bits, _, _, _ = tl.philox(seed, c0, zero + c1, zero + 1, zero)
        tl.store(out + offs, bits.to(tl.int64), mask=offs < n)

    for seed in (0, 1, 2 ** 61 + 12345):
        seeds = torch.tensor([seed], dtype=torch.long, device=triton_device)
        out = torch.empty(256, dtype=torch.long, device=triton_device)
        kernel[(1,)](seeds, out, 256, 5, BLOCK=256)
        ref = ph.philox(seeds, torch.arange(256, device=triton_device), 5, 1, 0)
        assert torch.equal(out & 0xFFFFFFFF, ref)


def test_the_cpu_run_uses_the_triton_interpreter():
    """Kernel tests skip when Triton was imported before interpreter mode was set; on a CPU machine with
    Triton that must fail here instead of silently skipping every kernel test (tests/conftest.py sets it)."""
    from canvaslm.kernels import interpreting, triton_available

    if torch.cuda.is_available() or not triton_available():
        pytest.skip("a GPU runs the kernels for real; without triton there is nothing to interpret")
    assert interpreting()
