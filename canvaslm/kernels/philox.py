"""Counter-based random numbers (Philox-4x32, 10 rounds) in PyTorch, bit-identical to `tl.philox`.

A random number is a pure function of (seed, counter), so the fused sampler can draw the Gumbel noise of
any (row, position, vocabulary entry) in any order, on any device, chunked or not, and a request's draws
never depend on what it was batched with. The PyTorch version is the reference for the Triton kernels and
the CPU path of the fused sampler.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
SEED_HIGH = 1 << 62  # seeds are drawn in [0, 2**62): int64-safe on every backend
STREAM_GUMBEL, STREAM_NOISE = 0, 1  # counter word c2 separates the two uses


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 -> 64-bit product of a constant and uint32 values held in int64: the int64 product wraps
    (two's complement), and its two 32-bit halves are exactly the unsigned product's."""
    prod = b * a
    return (prod >> 32) & _M32, prod & _M32


def philox(seed: torch.Tensor, c0, c1, c2, c3, rounds: int = 10) -> torch.Tensor:
    """First output word of Philox-4x32 as int64 in [0, 2**32). seed: int64 tensor, counters: int64
    tensors or ints (taken mod 2**32); all broadcast together."""
    c0 = torch.as_tensor(c0, dtype=torch.long, device=seed.device) & _M32
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.long, device=seed.device) & _M32 for c in (c1, c2, c3))
    shape = torch.broadcast_shapes(seed.shape, c0.shape, c1.shape, c2.shape, c3.shape)
    c0, c2 = c0.expand(shape), c2.expand(shape)
    k0, k1 = seed & _M32, (seed >> 32) & _M32  # keys stay at the seed's (broadcastable) shape
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _M32, (k1 + KEY_B) & _M32
    return c0


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in the open interval (0, 1): 23 random bits, centred, exact in fp32."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def gumbel(bits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise: argmax(logits + g) is a sample of softmax(logits) (the Gumbel-max trick).
    g = -log(-log(1 - v)) with v = (x + 0.5) / 2**32 from all 32 bits of the word x: the tail reaches 22.9
    (23 bits stopped at 16.6 and under-drew tokens more than ~16 nats below the top); -log(1 - v) by its
    series for small v, where 1 - v would round to 1. vocab_stats_triton computes the same, step for step."""
    v = ((bits.to(torch.float32) + 0.5) * 2.0 ** -32).clamp(max=1 - 2.0 ** -24)  # x near 2**32 rounds to 1
    e = torch.where(v < 2.0 ** -7, v * (1.0 + v * (0.5 + v * (1 / 3 + v * 0.25))), -torch.log(1.0 - v))
    return -torch.log(e)


def seeded_generator(seed: int, device) -> torch.Generator:
    """A torch generator seeded with `seed` in [0, 2**64). A CPU generator keeps only a seed's low 32 bits, so
    there a larger seed is mixed down to 32 bits (splitmix64) first: its high bits count too (seeds below
    2**32 are taken as they are, as transformers seeds)."""
    g = torch.Generator(device=device)
    if g.device.type == "cpu" and seed >= 2**32:
        z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        seed = (z ^ (z >> 31)) & _M32
    g.manual_seed(seed)
    return g


def draw_seeds(gens, batch: int, device, active: torch.Tensor | None = None) -> torch.Tensor:
    """One fresh Philox seed per row [B] int64 from the request generators, drawn on the generator's
    device. A shared generator draws for every row (no host sync); with one generator per row, rows that
    are not `active` draw nothing (seed 0), so a request's stream never depends on its batch-mates."""
    if not isinstance(gens, (list, tuple)):
        g_dev = gens.device if gens is not None else device
        return torch.randint(0, SEED_HIGH, (batch,), generator=gens, device=g_dev).to(device)
    keep = [True] * len(gens) if active is None else active.tolist()
    return torch.cat([torch.randint(0, SEED_HIGH, (1,), generator=g, device=g.device).to(device) if k
                      else torch.zeros(1, dtype=torch.long, device=device) for g, k in zip(gens, keep)])
