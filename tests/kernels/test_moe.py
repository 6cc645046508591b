"""The fused MoE kernels against the reference per-expert loop (`Experts._loop`), in the interpreter."""

from __future__ import annotations

import pytest
import torch

from canvaslm.kernels.moe import align_by_expert, fused_moe
from canvaslm.model.moe import Experts


def _experts(d=32, inner=24, E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = Experts(d, inner, E)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.3)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.3)
    return ex


def _routing(N, K, E, seed=1, skip_expert=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(N, E, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1  # an expert no token picks
    weights, ids = torch.topk(torch.softmax(scores, -1), K, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def test_align_groups_assignments_by_expert():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    sorted_a, block_expert = align_by_expert(ids, 4, block_m=4)
    nk = ids.numel()
    blocks = sorted_a.view(-1, 4)
    for b, e in enumerate(block_expert.tolist()):
        rows = [a for a in blocks[b].tolist() if a < nk]
        if e < 0:
            assert rows == []
        else:
            assert all(ids.view(-1)[a] == e for a in rows)
    real = sorted_a[sorted_a < nk]
    assert sorted(real.tolist()) == list(range(nk))  # every assignment exactly once


@pytest.mark.parametrize("N,K,skip", [(1, 2, None), (13, 2, 3), (40, 3, None)])
def test_fused_matches_loop(triton_device, N, K, skip):
    ex = _experts().to(triton_device)
    x = torch.randn(N, 32, generator=torch.Generator().manual_seed(2)).to(triton_device)
    weights, ids = (t.to(triton_device) for t in _routing(N, K, 6, skip_expert=skip))
    ref = ex._loop(x, weights, ids)
    out = fused_moe(x, weights, ids, ex.gate_up_proj.detach(), ex.down_proj.detach())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_per_channel_scales_are_applied(triton_device):
    ex = _experts(E=4)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(3))
    weights, ids = _routing(9, 2, 4)
    gs = torch.rand(4, 48) + 0.5
    ds = torch.rand(4, 32) + 0.5
    scaled = Experts(32, 24, 4)
    with torch.no_grad():
        scaled.gate_up_proj.copy_(ex.gate_up_proj * gs[:, :, None])
        scaled.down_proj.copy_(ex.down_proj * ds[:, :, None])
    ref = scaled._loop(x, weights, ids)
    dev = triton_device
    out = fused_moe(x.to(dev), weights.to(dev), ids.to(dev), ex.gate_up_proj.detach().to(dev),
                    ex.down_proj.detach().to(dev), gs.to(dev), ds.to(dev))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


# (d, inner, group): groups narrower than the kernel's k-block (values scaled one by one: 8, 16, 32) and
# k-blocks inside one group (the group scale applied to the block's partial dot: 64, 128), odd widths,
# groups that do not divide the width
@pytest.mark.parametrize("d,inner,group", [(32, 24, 8), (33, 20, 16), (128, 40, 32), (256, 48, 64), (64, 48, 128)])
def test_int4_weights_match_the_dequantised_reference(triton_device, d, inner, group):
    """Packed int4 experts unpacked in the kernel give the reference's result: dequantise the experts,
    then the loop's maths."""
    from canvaslm.quant_int4 import Int4Experts

    q = Int4Experts.from_experts(_experts(d=d, inner=inner, E=5), group=group)
    x = torch.randn(13, d, generator=torch.Generator().manual_seed(5))
    weights, ids = _routing(13, 2, 5, skip_expert=2)
    ref = q._dequant(x, weights, ids)
    dev = triton_device
    out = fused_moe(x.to(dev), weights.to(dev), ids.to(dev), q.gate_up_proj.to(dev), q.down_proj.to(dev),
                    q.gate_up_proj_scale.to(dev), q.down_proj_scale.to(dev), group=group)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    q.impl = "triton"  # the module's own dispatch reaches the same kernel
    torch.testing.assert_close(q.to(dev)(x.to(dev), weights.to(dev), ids.to(dev)).cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 weights in Triton need a GPU")
def test_fp8_experts_triton_matches_dequant_reference():
    from canvaslm.quant import FP8Experts

    ex = _experts(d=256, inner=128, E=8).cuda().bfloat16()
    f8 = FP8Experts.from_experts(ex).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    weights, ids = (t.cuda() for t in _routing(64, 2, 8))
    ref = f8._dequant(x, weights, ids).float()
    out = fused_moe(x, weights, ids, f8.gate_up_proj, f8.down_proj, f8.gate_up_proj_scale,
                    f8.down_proj_scale).float()
    assert (out - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("is_cuda,needs_grad,triton_ok,grouped,few,expected", [
    (True, False, True, True, False, "triton"),
    (True, False, True, True, True, "triton"),  # inference: dense never pays where a kernel exists
    (True, False, False, True, False, "grouped"),
    (True, False, False, False, False, "loop"),
    (False, False, True, True, False, "loop"),
    (True, True, True, True, False, "loop"),  # training on a GPU, many experts: the loop has a backward
    (True, True, True, True, True, "dense"),  # few experts: no host syncs, a handful of kernels
    (False, True, True, True, True, "loop"),  # on a CPU the arithmetic counts: the loop
])
def test_auto_impl_trains_through_a_path_with_a_backward(is_cuda, needs_grad, triton_ok, grouped, few, expected):
    from canvaslm.model.moe import choose_impl

    assert choose_impl(is_cuda, needs_grad, triton_ok, grouped, few_experts=few) == expected


def test_dense_impl_matches_the_loop_forward_and_backward():
    """Dense runs every expert and weights the ones off a token's top-k by zero: same sums, same gradients
    for the input, the routing weights and every expert weight (experts nobody picked get zero)."""
    ex = _experts()
    weights, ids = _routing(40, 2, 6, skip_expert=5)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(7))
    grads = {}
    for impl in ("loop", "dense"):
        ex.impl = impl
        ex.zero_grad()
        xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = ex(xi, wi, ids)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads[impl] = [y.detach(), xi.grad, wi.grad, ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone()]
    for a, b in zip(grads["loop"], grads["dense"]):  # float32 sums in another order: ~1e-6 apart at worst
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert grads["dense"][3][5].abs().sum() == 0 and grads["dense"][3][4].abs().sum() > 0


@pytest.mark.parametrize("impl", ["grouped", "dense"])
def test_sync_free_impls_match_the_loop_without_a_syncing_op(impl):
    """The paths a GPU step runs (grouped GEMMs, dense; the Triton kernels' alignment) equal the loop
    and issue no op that makes the host wait for the device; the loop itself does issue such ops."""
    from canvaslm.testing import SyncRecorder

    ex = _experts()
    weights, ids = _routing(40, 2, 6, skip_expert=3)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ex._loop(x, weights, ids)
        ex.impl = impl
        with SyncRecorder() as rec:
            out = ex(x, weights, ids)
            align_by_expert(ids, 6)
        assert rec.found == []
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        with SyncRecorder() as rec:
            ex._loop(x, weights, ids)
        assert rec.found


@pytest.mark.parametrize("impl", ["triton", "grouped"])
def test_an_inference_only_impl_refuses_a_training_graph(impl):
    ex = _experts()
    ex.impl = impl
    weights, ids = _routing(5, 2, 6)
    with pytest.raises(ValueError, match=f"impl='{impl}' has no backward"):
        ex(torch.randn(5, 32), weights, ids)


def test_auto_impl_trains_every_expert_weight_and_the_routing_weights():
    ex = _experts()
    weights, ids = _routing(20, 2, 6)
    weights.requires_grad_(True)
    ex(torch.randn(20, 32), weights, ids).square().sum().backward()
    assert ex.gate_up_proj.grad is not None and ex.gate_up_proj.grad.abs().sum() > 0
    assert ex.down_proj.grad is not None and ex.down_proj.grad.abs().sum() > 0
    assert weights.grad is not None and weights.grad.abs().sum() > 0


@pytest.mark.parametrize("d_in,d_out,group,bias", [(33, 20, 16, True), (256, 48, 64, False), (70, 130, 128, True)])
def test_int4_linear_kernel_matches_dequantised_weights(triton_device, d_in, d_out, group, bias):
    """Int4Linear through the down kernel (a one-expert MoE) equals x @ dequant(W)^T + b, for inputs of
    any leading shape; the module takes it when asked."""
    from canvaslm.kernels.moe import int4_linear
    from canvaslm.quant_int4 import Int4Linear

    lin = torch.nn.Linear(d_in, d_out, bias=bias)
    q = Int4Linear.from_linear(lin, group=group)
    x = torch.randn(3, 7, d_in, generator=torch.Generator().manual_seed(6))
    ref = q(x)  # CPU, no Triton asked: the dequantising reference
    dev = triton_device
    out = int4_linear(x.to(dev), q.weight.to(dev), q.weight_scale.to(dev), group,
                      None if q.bias is None else q.bias.to(dev))
    assert out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    q.impl = "triton"
    torch.testing.assert_close(q.to(dev)(x.to(dev)).cpu(), ref, rtol=1e-4, atol=1e-4)
