"""Parity with `transformers` where a review found canvaslm differed: the encoder's own attention biases
(attention_bias), proportional RoPE's `factor`, per_layer_config overrides canvaslm cannot run, and
generation_config.json's `max_length`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from canvaslm import LLM, SamplingParams
from canvaslm.checkpoint import load_model, save_model
from canvaslm.config import ConfigError, DiffusionParams, ModelConfig
from canvaslm.generate import GenerationError
from canvaslm.kv_cache import KVCache

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=8, position_embedding_size=64)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, sliding_window=4,
            num_experts=2, top_k_experts=1, moe_intermediate_size=8, max_position_embeddings=256,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
CANVAS = 4
TOL = 1e-4


def _reference(out_dir, biases: bool = False, **text):
    """A tiny transformers model, perturbed (norms, scales, layer scalars; with `biases`, every attention
    bias drawn on its own, the encoder's unlike the decoder's, as in a trained checkpoint), saved."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config={**TEXT, **text}, vision_config=VISION, canvas_length=CANVAS)
    torch.manual_seed(0)
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n or "scale" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif n.endswith("embed_tokens.weight"):
                p.mul_(30.0)
            elif biases and n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for n, b in ref.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(0.5 + torch.rand((), generator=g).item())
    ref.save_pretrained(out_dir)
    return ref


def _ref_cache(ref):
    from transformers.cache_utils import DynamicCache
    return DynamicCache(config=ref.config.get_text_config(decoder=True))


def _prompt(n, seed=1):
    return torch.randint(3, TEXT["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _assert_parity(model, ref, n=11):
    """canvaslm's encoder hidden states and decoder logits equal the reference's."""
    ids = torch.tensor([_prompt(n)])
    cache_ref = _ref_cache(ref)
    want = ref.model.encoder(input_ids=ids, past_key_values=cache_ref, position_ids=torch.arange(n)[None])
    cache = KVCache(model.cfg, 1, n + CANVAS)
    got = model.encode(ids, torch.arange(n)[None], torch.tensor([0]), cache)
    assert (got - want.last_hidden_state).abs().max() <= TOL * max(1.0, got.abs().max().item())
    canvas = torch.randint(0, TEXT["vocab_size"], (1, CANVAS), generator=torch.Generator().manual_seed(2))
    logits = model.denoise(canvas, torch.tensor([0]), cache)
    assert (logits - ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits).abs().max() <= TOL


# --- 1. attention_bias: the encoder's own q/k/v/o biases ------------------------------------------------

@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    out = tmp_path_factory.mktemp("biased")
    ref = _reference(out, biases=True, attention_bias=True)
    enc = ref.model.encoder.language_model.layers[0].self_attn.q_proj.bias
    dec = ref.model.decoder.layers[0].self_attn.q_proj.bias
    assert enc.abs().min() > 0 and not torch.equal(enc, dec)  # trained-like: two different, non-zero sets
    return out, ref


def test_the_encoder_runs_its_own_attention_biases(biased):
    path, ref = biased
    model = load_model(path)
    own = model.model.encoder.language_model.layers[2].self_attn
    assert own.v_proj is None  # a full layer has no v_proj
    assert torch.equal(own.k_proj.bias, ref.model.encoder.language_model.layers[2].self_attn.k_proj.bias)
    _assert_parity(model, ref)


def test_an_export_keeps_the_encoder_biases(biased, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    path, ref = biased
    save_model(load_model(path), tmp_path / "out")
    stored = load_file(tmp_path / "out" / "model.safetensors")
    for n, p in ref.state_dict().items():
        if n.startswith("model.encoder.language_model.layers.") and n.endswith("bias"):
            assert torch.equal(stored[n], p), n
    back = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "out").eval()
    _assert_parity(load_model(tmp_path / "out"), back)
    _assert_parity(load_model(tmp_path / "out"), ref)


def test_encoder_biases_under_a_wrapped_projection(biased):
    """A LoRA-wrapped projection (the trainer's) takes the encoder's biases too; a zero adapter changes nothing."""
    from canvaslm.train.lora import LoRALinear

    path, ref = biased
    model = load_model(path)
    for layer in model.text.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(layer.self_attn, name) is not None:
                setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), 2, 1.0))
    _assert_parity(model, ref)


def test_a_checkpoint_without_encoder_biases_gives_the_encoder_the_decoders(biased, tmp_path, caplog):
    """canvaslm's earlier exports wrote no encoder biases; their models ran the encoder with the decoder's."""
    import shutil

    path, _ = biased
    out = tmp_path / "old"
    shutil.copytree(path, out)
    tensors = load_file(out / "model.safetensors")
    dropped = [n for n in tensors if n.startswith("model.encoder.language_model.layers.") and n.endswith("bias")]
    assert dropped
    save_file({n: t for n, t in tensors.items() if n not in dropped}, out / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="canvaslm"):
        model = load_model(out)
    assert "no encoder attention biases" in caplog.text
    for n in dropped:
        dec = n.replace("model.encoder.language_model.", "model.decoder.")
        assert torch.equal(model.get_parameter(n), tensors[dec]), n


def test_without_attention_bias_the_encoder_holds_only_its_scalars(tmp_path):
    from canvaslm.checkpoint import build_random_model

    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": TEXT, "canvas_length": CANVAS})
    model = build_random_model(cfg)
    assert [n for n, _ in model.model.encoder.named_parameters()] == []
    assert sorted(n for n, _ in model.model.encoder.named_buffers())[0].endswith("layer_scalar")


# --- 2. proportional RoPE's factor -------------------------------------------------------------------------

ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                           "factor": 8.0}}


def test_proportional_rope_factor_divides_the_frequencies(tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    ref = _reference(tmp_path / "m", rope_parameters=ROPE)
    model = load_model(tmp_path / "m")
    assert torch.allclose(model.rotary.full_attention_inv_freq, ref.model.decoder.rotary_emb.full_attention_inv_freq)
    _assert_parity(model, ref)
    assert model.cfg.to_hf_dict()["text_config"]["rope_parameters"]["full_attention"]["factor"] == 8.0
    save_model(model, tmp_path / "out")
    back = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "out").eval()
    _assert_parity(load_model(tmp_path / "out"), back)


def _cfg(**text):
    return {"model_type": "diffusion_gemma", "text_config": {**TEXT, **text}, "canvas_length": CANVAS}


@pytest.mark.parametrize("factor", [0, -1.0, "8", float("inf")])
def test_a_bad_rope_factor_is_named(factor):
    rope = json.loads(json.dumps(ROPE))
    rope["full_attention"]["factor"] = factor
    with pytest.raises(ConfigError, match=r"rope_parameters\['full_attention'\]\.factor"):
        ModelConfig.from_dict(_cfg(rope_parameters=rope))


def test_rope_keys_nothing_reads_are_named_and_real_configs_load_quietly(caplog):
    from transformers import DiffusionGemmaConfig

    # transformers' default rope_parameters, as a checkpoint's config.json has them
    real = DiffusionGemmaConfig(text_config=TEXT, vision_config=VISION, canvas_length=CANVAS).to_dict()
    assert real["text_config"]["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    with caplog.at_level(logging.WARNING, logger="canvaslm"):
        cfg = ModelConfig.from_dict(real)
    assert "rope_parameters" not in caplog.text
    assert cfg.rope["full_attention"].factor == 1.0
    assert "factor" not in cfg.to_hf_dict()["text_config"]["rope_parameters"]["full_attention"]
    rope = json.loads(json.dumps(ROPE))
    rope["sliding_attention"]["factor"] = 4.0  # transformers' default RoPE does not read it either
    with caplog.at_level(logging.WARNING, logger="canvaslm"):
        cfg = ModelConfig.from_dict(_cfg(rope_parameters=rope))
    assert "rope_parameters['sliding_attention']: ignoring ['factor']" in caplog.text
    assert cfg.rope["sliding_attention"].factor == 1.0


# --- 3. per_layer_config -----------------------------------------------------------------------------------

FOUR = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                              "full_attention"])


@pytest.mark.parametrize("per_layer, message", [
    ({"1": {"head_dim": 16}, "3": {"head_dim": 32}},
     r"per_layer_config gives full_attention layers different head_dim \(layer 1: 16, layer 3: 32\)"),
    ({"1": {"head_dim": 16}}, r"per_layer_config gives full_attention layers different head_dim \(layer 1: 16, "
                              r"layer 3: 8\)"),
    ({"0": {"head_dim": 16}}, r"per_layer_config gives sliding_attention layers different head_dim"),
    ({"1": {"head_dim": 16, "num_key_value_heads": 1}, "3": {"head_dim": 16, "num_key_value_heads": 2}},
     r"per_layer_config gives full_attention layers different num_key_value_heads \(layer 1: 1, layer 3: 2\)"),
    ({"1": {"head_dim": 16, "sliding_window": 2}, "3": {"head_dim": 16}},
     r"per_layer_config\['1'\]\.sliding_window is not supported"),
    ({"1": {"skip": ["mlp"]}, "3": {"skip": ["mlp"]}}, r"per_layer_config\['1'\]\.skip is not supported"),
])
def test_per_layer_overrides_canvaslm_cannot_run_are_refused(per_layer, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(_cfg(**FOUR, per_layer_config=per_layer))


def test_per_layer_overrides_shared_by_a_layer_type_load():
    cfg = ModelConfig.from_dict(_cfg(**FOUR, per_layer_config={"1": {"head_dim": 16, "num_key_value_heads": 1},
                                                               "3": {"head_dim": 16, "num_key_value_heads": 1}}))
    assert cfg.head_dims == (8, 16, 8, 16) and cfg.num_kv_heads == (2, 1, 2, 1)


# --- 4. generation_config.json max_length ------------------------------------------------------------------

def test_max_length_caps_prompt_plus_output_as_transformers_does(tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    _reference(tmp_path, max_position_embeddings=512)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_length": 20, "max_denoising_steps": 2,
                                                                  "eos_token_id": [63]}))
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    p = _prompt(9, seed=0)
    torch.manual_seed(0)
    want = ref.generate(torch.tensor([p])).sequences[0, len(p):].tolist()
    # transformers: max_new_tokens = 20 - 9 = 11, in whole canvases (12 tokens); canvaslm cuts its outputs at
    # max_new_tokens, as it does for a max_new_tokens given
    assert len(want) == 12
    llm = LLM(tmp_path, device="cpu", sampler_impl="reference")
    assert llm.defaults.max_length == 20
    assert llm.generate(p, SamplingParams(seed=0))[0].token_ids == want[:11]
    assert len(llm.generate(_prompt(5), SamplingParams(seed=0))[0].token_ids) == 15  # per prompt
    assert len(llm.generate(p, SamplingParams(seed=0, max_new_tokens=6))[0].token_ids) == 6  # given: it wins
    with pytest.raises(GenerationError, match=r"max_length=20 .* after a prompt of 20 tokens; set max_new_tokens"):
        llm.generate(_prompt(20), SamplingParams(seed=0))


def test_max_length_is_read_written_and_dropped_as_transformers_reads_it():
    assert DiffusionParams.from_dict({"max_length": 40}).max_length == 40
    assert DiffusionParams.from_dict({"max_length": 40, "max_new_tokens": 256}).max_length == 40  # 256: the default
    p = DiffusionParams.from_dict({"max_length": 40, "max_new_tokens": 100})  # max_new_tokens decides
    assert p.max_length is None and p.max_new_tokens == 100
    p = DiffusionParams.from_dict({"max_length": 40})
    assert p.to_hf_dict()["max_length"] == 40 and "max_new_tokens" not in p.to_hf_dict()
    assert DiffusionParams.from_dict(p.to_hf_dict()) == p
    assert p.replace(max_new_tokens=7).max_length is None
    assert p.for_prompt(15).max_new_tokens == 25 and p.for_prompt(15).max_length is None
    assert DiffusionParams().for_prompt(15) == DiffusionParams()
    with pytest.raises(ConfigError, match="max_length"):
        DiffusionParams.from_dict({"max_length": 0})


def test_the_server_takes_max_length_as_llm_does(tiny_checkpoint, tmp_path):
    """A generation_config's max_length (prompt + output) is LLM's default, and the server's when it does not
    fill the context (fill_context off); by default the server, as vLLM serves DiffusionGemma, ignores the
    checkpoint's lengths and runs to EOS or the end of the context."""
    import shutil

    from fastapi.testclient import TestClient

    from canvaslm.server.app import build_app
    from canvaslm.engine.engine import EngineConfig
    from canvaslm.server.launch import build_state

    ck = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, ck)
    gen = json.loads((ck / "generation_config.json").read_text())
    gen.pop("max_new_tokens", None)
    (ck / "generation_config.json").write_text(json.dumps({**gen, "max_length": 20}))
    state = build_state(ck, "cpu", "float32", EngineConfig(max_model_len=64), served_model_name="tiny")
    try:
        c = TestClient(build_app(state))
        prompt = "abcdef"
        n = len(state.tokenizer.encode(prompt))
        body = {"model": "tiny", "prompt": prompt, "seed": 0, "ignore_eos": True}
        r = c.post("/v1/completions", json=body)  # the default: whole canvases up to the context
        C = state.canvas_length
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == (64 - n) // C * C, r.text
        state.fill_context = False
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20 - n, r.text
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 30, "seed": 0})
        assert r.status_code == 400 and "max_length" in r.json()["error"]["message"], r.text
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 30, "seed": 0, "max_tokens": 3})
        assert r.status_code == 200
    finally:
        state.shutdown()
