"""Self-conditioning's soft embeddings, softmax(s) @ E, streamed over the vocabulary.

The reference (`DiffusionGemma.soft_embeddings`) takes a full softmax per row. Here an online softmax
walks vocabulary chunks: acc <- acc * exp(m_old - m_new) + exp(s - m_new) @ E[chunk], l likewise, so
only [N, chunk] probabilities and a float32 [N, d] accumulator exist, never a float32 copy of [N, V].
The chunk matmul runs in E's dtype (tensor cores) with float32 accumulation.
"""

from __future__ import annotations

import torch


class SoftEmbedAccumulator:
    """Online softmax(s) @ E over chunks of s [N, v] (float32, -inf = masked)."""

    def __init__(self, n: int, d: int, device):
        self.m = torch.full((n,), float("-inf"), device=device)
        self.l = torch.zeros(n, device=device)
        self.acc = torch.zeros(n, d, device=device)  # float32 [N, d]

    def add(self, s: torch.Tensor, weight_chunk: torch.Tensor):
        """s: [N, v] float32 scores; weight_chunk: [v, d] rows of E for those vocabulary ids."""
        m_new = torch.maximum(self.m, s.max(dim=-1).values)
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        a = torch.exp(self.m - m_use)  # [N]
        p = torch.exp(s - m_use[:, None])  # [N, v]
        self.l.mul_(a).add_(p.sum(-1))
        self.acc.mul_(a[:, None]).add_((p.to(weight_chunk.dtype) @ weight_chunk).float())
        self.m = m_new

    def result(self, scale: float, dtype) -> torch.Tensor:
        return (self.acc * (scale / self.l)[:, None]).to(dtype)  # [N, d]


def soft_embeddings_online(sc_logits: torch.Tensor, weight: torch.Tensor, scale: float,
                           chunk: int = 16384) -> torch.Tensor:
    """softmax(sc_logits) @ weight * scale; sc_logits [..., V] (any float dtype), weight [V, d]."""
    V = sc_logits.shape[-1]
    flat = sc_logits.reshape(-1, V)
    acc = SoftEmbedAccumulator(flat.shape[0], weight.shape[1], flat.device)
    for v0 in range(0, V, chunk):
        acc.add(flat[:, v0:v0 + chunk].float(), weight[v0:v0 + chunk])
    return acc.result(scale, weight.dtype).view(*sc_logits.shape[:-1], -1)
