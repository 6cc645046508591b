"""Int4 weights (W4A16, group-wise): rounding error, int4 modules vs the same maths on dequantised
weights, quantise-on-load through `load_model` / `LLM` / the CLI, and the errors bad settings get.
The Triton kernel's int4 path is checked in tests/kernels/test_moe.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from canvaslm.checkpoint import build_random_model, load_model, save_model
from canvaslm.model.moe import Experts
from canvaslm.quant import QuantError, _fp8_targets, quantize_model, weight_bytes
from canvaslm.quant_int4 import Int4Error, Int4Experts, Int4Linear, dequantize_int4, quantize_int4
from canvaslm.shapes import model_config
from tests.test_quant import _fake_quantized, _logits, _rel


@pytest.mark.parametrize("shape,group", [((50, 300), 128), ((3, 7, 33), 8), ((6, 256), 128), ((4, 5), 1)])
def test_roundtrip_error_is_half_a_step_at_most(shape, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, shape[-2])[:, None]
    q, s = quantize_int4(w, group)
    n_groups = -(-shape[-1] // group)
    assert q.dtype == torch.uint8 and q.shape == (*shape[:-1], -(-shape[-1] // 2))
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], n_groups)
    back = dequantize_int4(q, s, shape[-1], group)
    step = s.repeat_interleave(group, -1)[..., :shape[-1]]  # each value's own group scale
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    # the largest value of every group is exact (it sets the scale: 7 steps)
    pad = torch.nn.functional.pad(w.abs(), (0, n_groups * group - shape[-1]))
    top = pad.unflatten(-1, (n_groups, group)).amax(-1)
    torch.testing.assert_close(s * 7, top)
    if group > 1:
        assert 0.03 < _rel(back, w) < 0.15  # 4 bits: ~10 % of the weights' norm, not more, not exact
    assert (dequantize_int4(*quantize_int4(torch.zeros(3, 10), 4), 10, 4) == 0).all()


def test_quantising_in_chunks_bounds_the_temporaries(monkeypatch):
    """A big expert tensor is quantised a few rows at a time: the same codes and scales as in one go,
    with temporaries a small fraction of one float32 copy (what lets int4 load on a nearly full GPU)."""
    from canvaslm import quant_int4
    from tests.kernels.conftest import cpu_peak_bytes

    w = torch.randn(8, 64, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = quantize_int4(w)
    monkeypatch.setattr(quant_int4, "CHUNK_VALUES", 4096)
    chunked = quantize_int4(w)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    out_bytes = whole[0].numel() + whole[1].numel() * 4
    peak = cpu_peak_bytes(lambda: quantize_int4(w))
    assert peak < out_bytes + w.numel() * 4 // 4, (peak, out_bytes)  # under a quarter of one float32 copy
    monkeypatch.setattr(quant_int4, "CHUNK_VALUES", 1 << 30)
    assert cpu_peak_bytes(lambda: quantize_int4(w)) > out_bytes + w.numel() * 4  # in one go: several copies


def test_bad_group_size_is_named():
    with pytest.raises(Int4Error, match="group size must be a positive integer, got 0"):
        quantize_int4(torch.randn(4, 8), 0)


def test_int4_linear_and_experts_compute_with_the_dequantised_weights():
    lin = torch.nn.Linear(70, 48, bias=True)
    x = torch.randn(5, 70)
    q = Int4Linear.from_linear(lin, group=32)
    want = torch.nn.functional.linear(x, dequantize_int4(q.weight, q.weight_scale, 70, 32), lin.bias)
    torch.testing.assert_close(q(x), want)
    assert 0.01 < _rel(q(x), lin(x)) < 0.2
    ex = Experts(32, 16, 4)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    q = Int4Experts.from_experts(ex, group=8)
    fake = Experts(32, 16, 4)
    with torch.no_grad():
        fake.gate_up_proj.copy_(dequantize_int4(q.gate_up_proj, q.gate_up_proj_scale, 32, 8))
        fake.down_proj.copy_(dequantize_int4(q.down_proj, q.down_proj_scale, 16, 8))
    x = torch.randn(10, 32)
    weights, ids = torch.rand(10, 2).softmax(-1), torch.randint(0, 4, (10, 2))
    torch.testing.assert_close(q(x, weights, ids), fake._loop(x, weights, ids))
    assert 0.01 < _rel(q(x, weights, ids), ex._loop(x, weights, ids)) < 0.25


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = model_config("tiny", canvas_length=8)
    model = build_random_model(cfg, seed=0, std=0.05)
    return model, save_model(model, tmp_path_factory.mktemp("int4") / "m")


def test_quantize_on_load_runs_the_quantised_maths_in_an_eighth_of_the_bytes(tiny):
    model, path = tiny
    q = load_model(path, quantization="int4")
    layer = q.text.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int4Linear) and isinstance(layer.experts, Int4Experts)
    assert layer.experts.gate_up_proj.dtype == torch.uint8
    assert layer.self_attn.q_proj.weight_scale.dtype == torch.float32
    assert not isinstance(layer.router.proj, Int4Linear)  # precision-sensitive, stays
    with torch.no_grad():
        fake = _fake_quantized(model, roundtrip=lambda w, _: dequantize_int4(*quantize_int4(w), w.shape[-1]))
        out, fake, orig = _logits(q), _logits(fake), _logits(model)
    assert _rel(out, fake) < 1e-4  # exactly the quantised weights' maths
    # close to the float model (unrelated logits are ~1.4 apart), and further from it than FP8 is:
    # a random 3-layer model compounds errors, so this is loose
    with torch.no_grad():
        fp8 = _logits(load_model(path, quantization="fp8"))
    assert _rel(fp8, orig) < _rel(out, orig) < 0.8
    # the quantised targets hold 4 bits a weight (+ one float32 scale per 128): ~1/8 of their float32 bytes
    names = sum(_fp8_targets(model), [])
    before = sum(weight_bytes(model.get_submodule(n)) for n in names)
    after = sum(weight_bytes(q.get_submodule(n)) for n in names)  # scales included
    assert before / 8 < after < before / 7
    # quantize_model (in memory) gives the same model as quantising while loading
    mem = quantize_model(build_random_model(model.cfg, seed=0, std=0.05), fmt="int4")
    mem.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert _rel(_logits(mem), out) < 1e-6


def test_llm_and_cli_take_the_quantization(tiny, tiny_checkpoint):
    from canvaslm import LLM, SamplingParams

    llm = LLM(tiny_checkpoint, device="cpu", quantization="int4")
    assert isinstance(llm.model.text.layers[0].experts, Int4Experts)
    out = llm.generate("hello", SamplingParams(max_new_tokens=16, max_denoising_steps=4, seed=0))[0]
    assert out.token_ids and out.decoder_passes > 0
    proc = subprocess.run([sys.executable, "-m", "canvaslm.cli", "generate", str(tiny_checkpoint), "--prompt", "hi",
                           "--max-new-tokens", "16", "--steps", "2", "--seed", "1", "--json", "--quantization", "int4",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"]
    proc = subprocess.run([sys.executable, "-m", "canvaslm.cli", "generate", str(tiny_checkpoint), "--prompt", "hi",
                           "--quantization", "int3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "int3" in proc.stderr


def test_bad_quantization_settings_are_named(tiny, tmp_path):
    model, path = tiny
    with pytest.raises(QuantError, match="'nf4' is not supported; expected one of"):
        load_model(path, quantization="nf4")
    with pytest.raises(QuantError, match="'nf4' is not supported"):
        quantize_model(build_random_model(model.cfg), fmt="nf4")
    save_model(model, tmp_path / "fp8")
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="'int4' needs a bf16/fp32 checkpoint; this one is already FP8"):
        load_model(tmp_path / "fp8", quantization="int4")


def test_quantised_experts_take_the_differentiable_path_when_training():
    """The fused kernels have no backward: under "auto" a step that needs gradients (QLoRA) takes the
    dequantising path, and an explicit "triton" refuses it by name; inference may take the kernels."""
    from canvaslm.quant import use_fused_kernel

    x, w = torch.randn(3, 8, requires_grad=True), torch.rand(3, 2)
    assert not use_fused_kernel("auto", x, w)
    with pytest.raises(ValueError, match="impl='triton' have no backward"):
        use_fused_kernel("triton", x, w)
    with torch.no_grad():
        assert use_fused_kernel("triton", x, w)
    assert use_fused_kernel("triton", x.detach(), w)
    dense = Experts(8, 4, 3)
    with torch.no_grad():
        dense.gate_up_proj.normal_(0, 0.3)
        dense.down_proj.normal_(0, 0.3)
    ex = Int4Experts.from_experts(dense, group=4)
    ids = torch.randint(0, 3, (3, 2))
    ex(x, w, ids).sum().backward()  # auto on CPU: the dequantising path, gradients reach the input
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quantised_checkpoints_save_and_load_back_exactly(tiny, tmp_path, fmt):
    """save_model writes a quantised model as it is (codes, scales, the quantization_config that
    describes them); load_model reads it back into the same modules with the same logits."""
    from canvaslm.quant import FP8Experts

    model, _ = tiny
    q = quantize_model(model_copy(model), fmt=fmt)
    path = save_model(q, tmp_path / "q", dtype="bfloat16")  # unquantised weights in bf16, codes untouched
    raw = json.loads((path / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == ("canvaslm-int4" if fmt == "int4" else "compressed-tensors")
    back = load_model(path, dtype="float32")
    assert isinstance(back.text.layers[0].experts, Int4Experts if fmt == "int4" else FP8Experts)
    stored = back.state_dict()
    for k, a in q.state_dict().items():
        if not a.is_floating_point() or a.element_size() == 1 or k.endswith("_scale"):
            assert torch.equal(a, stored[k]), k  # codes and scales stored as they are
    exact = load_model(save_model(q, tmp_path / "q32"))
    with torch.no_grad():
        assert _rel(_logits(exact), _logits(q)) < 1e-6
    with pytest.raises(QuantError, match=f"already {fmt.upper()}"):
        load_model(path, quantization="fp8" if fmt == "int4" else "int4")


def model_copy(model):
    copy = build_random_model(model.cfg, seed=1)
    copy.load_state_dict(model.state_dict())
    return copy


def test_a_float_model_saves_without_a_stale_quantization_config(tiny, tmp_path):
    model, _ = tiny
    q = load_model(save_model(quantize_model(model_copy(model), fmt="int4"), tmp_path / "q"))
    plain = build_random_model(q.cfg, seed=0, std=0.05)  # its config came from the int4 checkpoint
    assert "quantization_config" in json.dumps(q.cfg.raw)
    out = save_model(plain, tmp_path / "plain")
    assert "quantization_config" not in (out / "config.json").read_text()
    assert type(load_model(out).text.layers[0].experts) is Experts


def test_bad_int4_checkpoints_are_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = tiny
    path = save_model(quantize_model(model_copy(model), fmt="int4"), tmp_path / "q")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="group_size must be a positive integer, got 0"):
        load_model(path)
    cfg["quantization_config"]["group_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(path / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name].float()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(QuantError, match=f"{name}: dtype torch.float32, expected uint8"):
        load_model(path)


def test_cli_quantize_writes_a_checkpoint_that_generates_like_quantising_on_load(tiny_checkpoint, tmp_path, capsys):
    from canvaslm import LLM, SamplingParams
    from canvaslm.cli import main

    assert main(["quantize", str(tiny_checkpoint), str(tmp_path / "q4"), "--to", "int4", "--dtype", "float32"]) == 0
    assert "int4" in capsys.readouterr().out and (tmp_path / "q4" / "tokenizer.json").is_file()
    sp = SamplingParams(max_new_tokens=16, max_denoising_steps=4, seed=3)
    stored = LLM(tmp_path / "q4", device="cpu").generate("hello", sp)[0]
    on_load = LLM(tiny_checkpoint, device="cpu", quantization="int4").generate("hello", sp)[0]
    assert stored.token_ids == on_load.token_ids
    # the default stores the unquantised weights in bf16: it generates like quantising on load in bf16
    assert main(["quantize", str(tiny_checkpoint), str(tmp_path / "q4bf"), "--to", "int4"]) == 0
    stored = LLM(tmp_path / "q4bf", device="cpu").generate("hello", sp)[0]
    on_load = LLM(tiny_checkpoint, device="cpu", quantization="int4", dtype="bfloat16").generate("hello", sp)[0]
    assert stored.token_ids == on_load.token_ids
    assert main(["quantize", str(tiny_checkpoint), str(tiny_checkpoint), "--to", "int4"]) == 2
    assert "DST must be a new directory" in capsys.readouterr().err
