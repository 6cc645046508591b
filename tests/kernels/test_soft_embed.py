"""Online softmax @ E equals the row-chunked reference of the model, without a float32 [N, V] copy."""

from __future__ import annotations

import torch

from canvaslm.kernels.soft_embed import soft_embeddings_online
from tests.kernels.conftest import cpu_peak_bytes


def test_matches_full_softmax_with_masked_entries():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 1000, generator=g) * 4
    logits[0, 0, :990] = float("-inf")  # a nearly fully masked row
    w = torch.randn(1000, 24, generator=g)
    ref = torch.softmax(logits, -1) @ w * 2.0
    out = soft_embeddings_online(logits, w, 2.0, chunk=128)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_logits_stay_within_bf16_tolerance():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 2000, generator=g) * 3).bfloat16()
    w = torch.randn(2000, 16, generator=g).bfloat16()
    ref = (torch.softmax(logits.float(), -1) @ w.float())
    out = soft_embeddings_online(logits, w, 1.0, chunk=512).float()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_memory_is_per_chunk_not_per_vocabulary():
    logits = torch.randn(64, 65536)  # 16 MiB fp32
    w = torch.randn(65536, 32)
    full = logits.numel() * 4
    peak = cpu_peak_bytes(lambda: soft_embeddings_online(logits, w, 1.0, chunk=2048))
    assert peak < full / 4, f"online soft embeddings peaked at {peak} bytes (a full fp32 copy is {full})"
