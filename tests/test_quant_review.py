"""Quantisation review: `canvaslm memory` counts only the modules a pre-quantised checkpoint stores
quantised, Ollama's details name quantised weights, a quantised vision tower is refused at load by name,
and compressed-tensors configs missing their weights' scheme are refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from canvaslm.checkpoint import build_random_model, load_model, save_model
from canvaslm.cli import main
from canvaslm.config import ModelConfig
from canvaslm.memory import plan, weight_bytes
from canvaslm.model.diffusion_gemma import DiffusionGemma
from canvaslm.model.moe import Experts
from canvaslm.quant import QuantError, parameter_count, quantize_fp8, quantize_model
from canvaslm.quant_int4 import Int4Linear
from canvaslm.quant_io import LoadHook, scheme_from_config
from canvaslm.shapes import model_config
from tests.test_quant import _write_compressed_tensors


def _held(model) -> int:
    return sum(t.numel() * t.element_size() for n, t in (*model.named_parameters(), *model.named_buffers())
               if not n.startswith("rotary."))


@pytest.fixture(scope="module")
def tiny():
    return build_random_model(model_config("tiny", canvas_length=8), seed=0, std=0.05)


# 1. canvaslm memory ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["channel", "block", "tensor"])
def test_memory_counts_what_a_compressed_tensors_checkpoint_loads(tiny, tmp_path, strategy, capsys):
    """Block / per-tensor checkpoints keep the experts in the model dtype (their scales would be refused):
    the estimate was the FP8 experts' size, a quarter of what loading holds for them."""
    path = tmp_path / strategy
    _write_compressed_tensors(tiny, path, strategy)
    model = load_model(path, dtype="bfloat16")
    assert isinstance(model.text.layers[0].experts, Experts) == (strategy != "channel")
    cfg = ModelConfig.from_dir(path)
    assert weight_bytes(cfg, "bfloat16", model_dir=path) == _held(model)
    assert weight_bytes(cfg, "bfloat16") == _held(model)  # names unknown (a repo id): by the strategy
    assert plan(cfg, 80, model_dir=path)["weights"] == _held(model)
    assert main(["memory", str(path), "--gpu-memory", "80", "--dtype", "bfloat16"]) == 0
    assert f"weights {_held(model) / 2**30:.1f} GiB (fp8)" in capsys.readouterr().out


def test_memory_reads_which_modules_a_checkpoint_left_unquantised(tiny, tmp_path):
    """A channel checkpoint that left the experts (and one linear) in bf16: counted as the loader holds it."""
    path = tmp_path / "partial"
    _write_compressed_tensors(tiny, path, "channel")
    t = load_file(str(path / "model.safetensors"))
    plain = build_random_model(tiny.cfg, seed=0, std=0.05).state_dict()
    for k in [k for k in t if ".experts." in k or k.startswith("model.decoder.layers.0.self_attn.q_proj.")]:
        if k.endswith("_scale"):
            del t[k]
        else:
            t[k] = plain[k]
    save_file(t, str(path / "model.safetensors"))
    model = load_model(path, dtype="bfloat16")
    assert weight_bytes(ModelConfig.from_dir(path), "bfloat16", model_dir=path) == _held(model)


def test_memory_at_26b_a4b_with_block_fp8_counts_bf16_experts():
    """The review's case: 24.3 GiB estimated for weights that take 45.5 GiB, and a 67k context planned on a
    48 GiB GPU that cannot hold them."""
    raw = model_config("26b-a4b").to_hf_dict()
    raw["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "config_groups": {"g": {"targets": ["Linear"], "weights": {
                                      "num_bits": 8, "type": "float", "strategy": "block",
                                      "block_structure": [128, 128], "symmetric": True, "dynamic": False}}}}
    cfg = ModelConfig.from_dict(raw)
    assert 45 * 2**30 < weight_bytes(cfg, "bfloat16") < 46 * 2**30
    with pytest.raises(ValueError, match="no room for a KV cache"):
        plan(cfg, 48.0)


# 2. Ollama details -----------------------------------------------------------------------------------------

def _details(model):
    import types

    from canvaslm.server.ollama import _details

    return _details(types.SimpleNamespace(engine=types.SimpleNamespace(runner=types.SimpleNamespace(model=model))))


def test_ollama_details_count_logical_weights_and_name_the_format():
    cfg = model_config("26b-a4b")
    got = {}
    for fmt in (None, "fp8", "int4"):
        with torch.device("meta"):
            model = DiffusionGemma(cfg).to(torch.bfloat16)
        if fmt:
            LoadHook(model, "quantize", fmt=fmt)
        d = _details(model)
        got[fmt] = (d["parameter_size"], d["quantization_level"])
    assert got == {None: ("25.3B", "BF16"), "fp8": ("25.3B", "FP8"), "int4": ("25.3B", "INT4")}


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_parameter_count_is_the_unquantised_models(tiny, fmt):
    plain = build_random_model(tiny.cfg, seed=0, std=0.05)
    want = sum(p.numel() for p in plain.parameters())
    assert parameter_count(quantize_model(plain, fmt=fmt)) == want
    odd = torch.nn.Linear(33, 5, bias=True)  # an odd width: the padding nibble is no weight
    assert parameter_count(Int4Linear.from_linear(odd, 8)) == 33 * 5 + 5


# 3. a quantised vision tower -------------------------------------------------------------------------------

def test_a_quantised_vision_tower_takes_text_and_refuses_images_by_name(tmp_path):
    """llm-compressor's targets=Linear without a vision ignore: every image failed on the tower's 'unexpected
    key' weight_scale. The text model still loads and serves (as it did, and with images off); an image is
    refused naming the scales and the way out."""
    from conftest import build_vision_chat_checkpoint

    from canvaslm.llm import LLM, SamplingParams
    from canvaslm.multimodal import ImageError, Vision

    build_vision_chat_checkpoint(tmp_path / "v")
    assert main(["quantize", str(tmp_path / "v"), str(tmp_path / "fp8"), "--to", "fp8", "--dtype", "float32"]) == 0
    path = tmp_path / "fp8"
    t = load_file(str(path / "model.safetensors"))
    tower = [k for k in t if k.startswith("model.encoder.vision_tower") and k.endswith("proj.weight")
             and t[k].dim() == 2]
    assert tower
    for k in tower:
        t[k], t[k[:-len("weight")] + "weight_scale"] = quantize_fp8(t[k], "channel")
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    words = (r"vision_tower\..*\.weight_scale.*the vision tower is stored quantised.*text only.*"
             r"'re:\.\*vision_tower\.\*'.*--quantization fp8")
    llm = LLM(path, device="cpu")
    assert llm.generate(["hi"], SamplingParams(max_new_tokens=4))[0].token_ids  # text is served
    vision = Vision(llm.model, path)
    assert not vision.available
    with pytest.raises(ImageError, match=words):
        vision.need()
    assert weight_bytes(ModelConfig.from_dir(path), model_dir=path) > 0  # counted as it loads


# minor: compressed-tensors configs without their weights' scheme -------------------------------------------

@pytest.mark.parametrize("qc,field", [
    ({}, r"quantization_config\.config_groups is missing or empty"),
    ({"config_groups": {}}, r"quantization_config\.config_groups is missing or empty"),
    ({"config_groups": {"group_0": {"targets": ["Linear"], "input_activations": {
        "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
     r"quantization_config\.config_groups\.group_0\.weights is missing"),
])
def test_compressed_tensors_config_without_weights_scheme_names_the_field(qc, field):
    with pytest.raises(QuantError, match=field):
        scheme_from_config({"quantization_config": {"quant_method": "compressed-tensors", **qc}})


def test_a_saved_fp8_config_still_reads(tiny, tmp_path):
    path = save_model(quantize_model(build_random_model(tiny.cfg, seed=0, std=0.05), "block"), tmp_path / "q")
    assert scheme_from_config(json.loads((path / "config.json").read_text())) == {"fmt": "fp8", "strategy": "block"}
