"""FP8 weights: quantisation error, FP8 modules vs the full-precision maths, quantise-on-load, and loading a
compressed-tensors FP8 checkpoint (built here) with logits close to the original model's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from canvaslm.checkpoint import build_random_model, load_model, save_model
from canvaslm.kv_cache import KVCache
from canvaslm.model.moe import Experts
from canvaslm.quant import (FP8, _fp8_targets, FP8Experts, FP8Linear, QuantError, dequantize_fp8, quantize_fp8,
                            quantize_model, scale_shape)
from canvaslm.shapes import model_config


def _rel(a, b):
    return float((a.float() - b.float()).detach().norm() / b.float().detach().norm())


def _fake_quantized(model, strategy="channel", experts=True, roundtrip=None):
    """The same model with every quantisation target weight replaced by dequantise(quantise(w)), in
    float32: what a quantised model must compute exactly (up to float rounding). roundtrip(w, is_expert)
    gives that weight; by default FP8 (`strategy` for linears, per channel for experts)."""
    if roundtrip is None:
        def roundtrip(w, is_expert):
            s = "channel" if is_expert else strategy
            return dequantize_fp8(*quantize_fp8(w, s), s)
    fake = build_random_model(model.cfg, seed=0, std=0.05)
    fake.load_state_dict(model.state_dict())
    lin, ex = _fp8_targets(fake)
    with torch.no_grad():
        for n in lin:
            w = fake.get_submodule(n).weight
            w.copy_(roundtrip(w, False))
        for n in ex if experts else []:
            for p in ("gate_up_proj", "down_proj"):
                w = getattr(fake.get_submodule(n), p)
                w.copy_(roundtrip(w, True))
    return fake


@pytest.mark.parametrize("strategy", ["channel", "block", "tensor"])
def test_quantize_roundtrip(strategy):
    w = torch.randn(300, 260) * torch.linspace(0.1, 3, 300)[:, None]
    q, s = quantize_fp8(w, strategy)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert _rel(dequantize_fp8(q, s, strategy), w) < 0.04  # e4m3: 3 mantissa bits
    if strategy == "block":
        assert s.shape == (3, 3)


def test_fp8_linear_and_experts_match_full_precision():
    lin = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 64)
    assert _rel(FP8Linear.from_linear(lin)(x), lin(x)) < 0.05
    ex = Experts(32, 16, 4)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    x = torch.randn(10, 32)
    weights, ids = torch.rand(10, 2).softmax(-1), torch.randint(0, 4, (10, 2))
    assert _rel(FP8Experts.from_experts(ex)(x, weights, ids), ex._loop(x, weights, ids)) < 0.06


def _logits(model, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(cfg, 1, 64, dtype=model.embed_weight.dtype)
    slots = torch.zeros(1, dtype=torch.long)
    model.encode(torch.randint(0, cfg.vocab_size, (1, 12), generator=g), torch.arange(12)[None], slots, cache)
    return model.denoise(torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g), slots, cache)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = model_config("tiny", canvas_length=8)
    model = build_random_model(cfg, seed=0, std=0.05)
    out = save_model(model, tmp_path_factory.mktemp("bf16") / "m")
    return model, out


def test_quantize_on_load(tiny):
    model, path = tiny
    q = load_model(path, quantization="fp8")
    layer = q.text.layers[0]
    assert isinstance(layer.self_attn.q_proj, FP8Linear) and isinstance(layer.experts, FP8Experts)
    assert layer.self_attn.q_proj.weight.dtype == FP8
    assert not isinstance(layer.router.proj, FP8Linear)  # precision-sensitive, stays
    with torch.no_grad():
        out, fake, orig = _logits(q), _logits(_fake_quantized(model)), _logits(model)
    assert _rel(out, fake) < 1e-4  # exactly the quantised weights' maths
    assert _rel(out, orig) < 0.3  # FP8 tolerance on a random 3-layer model (chaotic: errors compound)
    with pytest.raises(QuantError, match="'int8' is not supported"):
        load_model(path, quantization="int8")


def _write_compressed_tensors(model, out, strategy):
    """An FP8 checkpoint the way compressed-tensors stores one: X.weight (e4m3) + X.weight_scale."""
    save_model(model, out)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    q = quantize_model(build_random_model(model.cfg, seed=0, std=0.05), "channel")
    for name, mod in q.named_modules():
        if isinstance(mod, FP8Linear):
            w, s = quantize_fp8(state[f"{name}.weight"], strategy)
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = w, s
        if isinstance(mod, FP8Experts) and strategy == "channel":
            for p in ("gate_up_proj", "down_proj"):
                w, s = quantize_fp8(state[f"{name}.{p}"], "channel")
                state[f"{name}.{p}"], state[f"{name}.{p}_scale"] = w, s  # [E, out, 1]
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
            **({"block_structure": [128, 128]} if strategy == "block" else {})},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
        "ignore": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("strategy", ["channel", "block"])
def test_load_compressed_tensors_checkpoint(tiny, tmp_path, strategy):
    model, _ = tiny
    _write_compressed_tensors(model, tmp_path / "fp8", strategy)
    q = load_model(tmp_path / "fp8", dtype="float32")
    lin = q.text.layers[1].mlp.gate_proj
    assert isinstance(lin, FP8Linear) and lin.strategy == strategy and lin.weight.dtype == FP8
    assert isinstance(q.text.layers[1].experts, FP8Experts if strategy == "channel" else Experts)
    with torch.no_grad():
        out = _logits(q)
        fake = _logits(_fake_quantized(model, strategy, experts=strategy == "channel"))
        orig = _logits(model)
    assert _rel(out, fake) < 1e-4
    assert _rel(out, orig) < 0.3


def test_unsupported_quant_method_is_named(tiny, tmp_path):
    model, _ = tiny
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="awq"):
        load_model(tmp_path / "m")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch._scaled_mm)")
def test_scaled_mm_path_matches_dequant_on_gpu():
    lin = torch.nn.Linear(256, 512, bias=False).cuda().bfloat16()
    f = FP8Linear.from_linear(lin)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, dequantize_fp8(f.weight, f.weight_scale, "channel", x.dtype))
    assert _rel(f(x), ref) < 0.05


@pytest.mark.parametrize("strategy", ["channel", "block", "tensor"])
def test_stacked_matrices_quantise_one_at_a_time(strategy):
    """[E, out, in] expert weights: the same codes and scales as quantising each matrix alone, with
    temporaries of one matrix (a 26B expert tensor in one go would take several float32 copies of it)."""
    from tests.kernels.conftest import cpu_peak_bytes

    w = torch.randn(24, 130, 200, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q, s = quantize_fp8(w, strategy)
    assert q.shape == w.shape and s.shape == (24, *scale_shape((130, 200), strategy))
    for e in range(24):
        qe, se = quantize_fp8(w[e], strategy)
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)
    out_bytes = q.numel() + s.numel() * 4
    assert cpu_peak_bytes(lambda: quantize_fp8(w, strategy)) < out_bytes + w.numel() * 4 // 2


def _quantized_copy(model, strategy):
    copy = build_random_model(model.cfg, seed=1)
    copy.load_state_dict(model.state_dict())
    return quantize_model(copy, strategy)


@pytest.mark.parametrize("strategy", ["channel", "block", "tensor"])
def test_each_strategy_saves_and_loads_back(tiny, tmp_path, strategy):
    """Experts are quantised per channel whatever the linears' strategy; the checkpoint loads back as is."""
    model, _ = tiny
    q = _quantized_copy(model, strategy)
    back = load_model(save_model(q, tmp_path / "q"))
    layer = back.text.layers[0]
    assert isinstance(layer.experts, FP8Experts) and layer.self_attn.q_proj.strategy == strategy
    stored = back.state_dict()
    for k, a in q.state_dict().items():
        if not k.startswith("rotary."):
            assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a,
                               stored[k].view(torch.uint8) if stored[k].dtype == FP8 else stored[k]), k
    with torch.no_grad():
        assert _rel(_logits(back), _logits(q)) < 1e-6


def test_block_scales_for_experts_are_named(tiny, tmp_path):
    from safetensors.torch import load_file

    model, _ = tiny
    path = save_model(_quantized_copy(model, "block"), tmp_path / "q")
    tensors = load_file(str(path / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("experts.down_proj_scale"))
    tensors[name] = tensors[name][:, :, None].expand(-1, -1, 2).contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(QuantError, match=f"{name}: shape .*per-channel scales"):
        load_model(path)


@pytest.mark.parametrize("suffix", ["self_attn.q_proj.weight_scale", "experts.gate_up_proj_scale",
                                    "experts.down_proj_scale"])
def test_an_fp8_checkpoint_missing_a_scale_is_refused(tiny, tmp_path, suffix):
    """Not loaded as a plain module holding the raw e4m3 codes as weights."""
    from safetensors.torch import load_file

    from canvaslm.checkpoint import CheckpointError

    model, _ = tiny
    path = save_model(_quantized_copy(model, "channel"), tmp_path / "q")
    tensors = load_file(str(path / "model.safetensors"))
    name = next(k for k in tensors if k.endswith(suffix))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"))
    want = f"in model.safetensors, but its scale {name} is missing" if suffix.endswith("weight_scale") else \
        f"(its scale {name} is missing|{name}: missing from the checkpoint)"
    with pytest.raises(CheckpointError, match=want):
        load_model(path)


@pytest.mark.parametrize("qc,key", [("fp8", "quantization_config"), (["fp8"], "quantization_config"),
                                    ({"quant_method": "compressed-tensors", "config_groups": {"g": "oops"}},
                                     "quantization_config.config_groups.g"),
                                    ({"quant_method": "compressed-tensors", "config_groups": ["g"]},
                                     "quantization_config.config_groups"),
                                    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": 8}}},
                                     "quantization_config.config_groups.g.weights"),
                                    ({"quant_method": "compressed-tensors", "config_groups": {
                                        "g": {"weights": {"strategy": ["channel"]}}}},
                                     "quantization_config.config_groups.g.weights.strategy")])
def test_a_malformed_quantization_config_is_named(tiny, tmp_path, qc, key):
    model, _ = tiny
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = qc
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=f"config.json: {key} "):
        load_model(tmp_path / "m")
