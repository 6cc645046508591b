"""Review fixes: replacing a checkpoint never deletes files it does not own, write failures are named
CheckpointErrors before or after the work, compressed-tensors variants (per-tensor (1,) scales, an FP8
router, static activations, KV-cache schemes) load or are refused by name, config keys that change the
model are validated or refused, and dtype names/`auto` are read alike everywhere."""

from __future__ import annotations

import copy
import errno
import json
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import canvaslm.checkpoint as ck
from canvaslm.checkpoint import CheckpointError, load_model, parse_dtype, save_model
from canvaslm.config import ConfigError, ModelConfig
from canvaslm.quant import QuantError, quantize_fp8, quantize_model
from canvaslm.quant_io import scheme_from_config
from canvaslm.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("review") / "model"
    make_tiny_checkpoint(path)
    return path


def _copy(src, dst, mutate_cfg=None, mutate_tensors=None):
    shutil.copytree(src, dst)
    if mutate_cfg is not None:
        cfg = json.loads((dst / "config.json").read_text())
        mutate_cfg(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if mutate_tensors is not None:
        t = load_file(dst / "model.safetensors")
        mutate_tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# 1. a replace never deletes what the checkpoint does not own ------------------------------------------

def test_quantize_into_a_repo_keeps_its_files(tiny, tmp_path):
    from canvaslm.cli import main

    repo = _copy(tiny, tmp_path / "repo")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref")
    (repo / "README.md").write_text("notes")
    before = sorted(p.name for p in repo.iterdir())
    assert main(["quantize", str(tiny), str(repo), "--to", "int4", "--dtype", "float32"]) == 2
    assert sorted(p.name for p in repo.iterdir()) == before
    assert (repo / "README.md").read_text() == "notes" and (repo / ".git" / "HEAD").read_text() == "ref"
    with pytest.raises(CheckpointError, match=r"repo: holds files that are not part of a checkpoint "
                                              r"\(\.git, README\.md\); refusing to replace it"):
        save_model(load_model(tiny), repo)


def test_replace_keeps_allowing_a_checkpoints_own_files(tiny, tmp_path):
    model = load_model(tiny)
    out = save_model(model, tmp_path / "out", extra_files={"tokenizer.json": tiny / "tokenizer.json"})
    (out / "model-00001-of-00003.safetensors").write_text("stale shard")
    (out / "special_tokens_map.json").write_text("{}")
    save_model(model, out)
    assert not (out / "model-00001-of-00003.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# 2. write failures: found before loading, or named after ---------------------------------------------

def test_quantize_refuses_an_unwritable_destination_before_loading(tiny, tmp_path, monkeypatch, capsys):
    from canvaslm import cli

    (tmp_path / "afile").write_text("x")
    loaded = []
    monkeypatch.setattr(ck, "load_model", lambda *a, **k: loaded.append(a))
    assert cli.main(["quantize", str(tiny), str(tmp_path / "afile" / "q"), "--to", "int4"]) == 2
    assert "q: cannot be created: " in (err := capsys.readouterr().err) and "afile is not a directory" in err

    real = ck.tempfile.mkdtemp

    def read_only(*a, dir=None, **k):
        if ".probe." in k.get("prefix", ""):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(ck.tempfile, "mkdtemp", read_only)
    assert cli.main(["quantize", str(tiny), str(tmp_path / "ro" / "q"), "--to", "int4"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ro' / 'q'}: cannot write there ({tmp_path}: Read-only file system)" in err
    assert "Traceback" not in err and not loaded


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 SafetensorError("Error while serializing: No space left on device")])
def test_disk_full_while_saving_is_a_named_error_and_keeps_the_old_checkpoint(tiny, tmp_path, monkeypatch,
                                                                                capsys, exc):
    from canvaslm import cli

    model = load_model(tiny)
    old = save_model(model, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    def full(*a, **k):
        raise exc

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match=r"q: cannot write the checkpoint: .*No space left on device.*"
                                              r"q was left as it was"):
        save_model(model, old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp dir left behind
    assert cli.main(["quantize", str(tiny), str(tmp_path / "new"), "--to", "int4"]) == 2
    err = capsys.readouterr().err
    assert "new: cannot write the checkpoint" in err and "new was not created" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tiny.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])


# 3. / 4. compressed-tensors variants -------------------------------------------------------------------

def test_per_tensor_fp8_scales_of_shape_1_load(tiny, tmp_path):
    m = load_model(tiny)
    quantize_model(m, strategy="tensor")
    out = save_model(m, tmp_path / "ct")
    t = load_file(out / "model.safetensors")
    for k in [k for k in t if k.endswith(".weight_scale")]:
        t[k] = t[k].reshape(1).to(torch.bfloat16)  # what compressed-tensors writes
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(out)
    want = dict(m.named_modules())
    checked = 0
    for name, mod in loaded.named_modules():
        if name.endswith("q_proj"):
            assert tuple(mod.weight_scale.shape) == (1, 1)
            torch.testing.assert_close(mod.weight_scale, want[name].weight_scale.to(torch.bfloat16).float())
            checked += 1
    assert checked and set(loaded.state_dict()) == set(m.state_dict())


def test_fp8_router_is_refused_by_name(tiny, tmp_path):
    m = load_model(tiny)
    quantize_model(m)
    src = save_model(m, tmp_path / "fp8")

    def router_fp8(t):
        for k in [k for k in t if k.endswith("router.proj.weight")]:
            q, s = quantize_fp8(t[k].float(), "channel")
            t[k], t[k[:-len("weight")] + "weight_scale"] = q, s.to(torch.bfloat16)

    out = _copy(src, tmp_path / "router", mutate_tensors=router_fp8)
    with pytest.raises(QuantError, match=r"^model\.decoder\.layers\.0\.router\.proj \(and \d+ more: .*\): stored "
                                         r"quantised .*MoE router stays in the model dtype.*re:\.\*router\.\*"):
        load_model(out)


def _ct(**extra):
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}}
    group = qc["config_groups"]["group_0"]
    for k, v in extra.items():
        if k in ("input_activations", "output_activations"):
            group[k] = v
        elif k.startswith("w_"):
            group["weights"][k[2:]] = v
        else:
            qc[k] = v
    return {"quantization_config": qc}


@pytest.mark.parametrize("extra,field", [
    ({"input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}},
     r"config_groups\.group_0\.input_activations .* static input scales"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}},
     r"quantization_config\.kv_cache_scheme is not supported"),
    ({"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}},
     r"quantization_config\.sparsity_config is not supported"),
    ({"transform_config": {"config_groups": {}}}, r"quantization_config\.transform_config is not supported"),
    ({"w_symmetric": False}, r"group_0\.weights\.symmetric=False is not supported"),
    ({"w_dynamic": True}, r"group_0\.weights\.dynamic=True is not supported"),
    ({"format": "nvfp4-pack-quantized"}, r"quantization_config\.format 'nvfp4-pack-quantized' is not supported"),
])
def test_compressed_tensors_features_we_do_not_read_are_refused_by_name(extra, field):
    with pytest.raises(QuantError, match=field):
        scheme_from_config(_ct(**extra))


def test_compressed_tensors_what_llm_compressor_writes_for_fp8_dynamic_is_accepted():
    dyn = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    assert scheme_from_config(_ct(input_activations=dyn, sparsity_config={}, kv_cache_scheme=None)) == \
        {"fmt": "fp8", "strategy": "channel"}
    assert scheme_from_config(_ct(sparsity_config={"format": "dense"})) == {"fmt": "fp8", "strategy": "channel"}


def test_static_activation_checkpoint_is_one_named_error(tiny, tmp_path):
    m = load_model(tiny)
    quantize_model(m)
    src = save_model(m, tmp_path / "fp8")

    def static(c):
        c["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
            "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}

    def scales(t):
        for k in [k for k in t if k.endswith(".weight_scale")]:
            t[k[:-len("weight_scale")] + "input_scale"] = torch.tensor([0.05])

    out = _copy(src, tmp_path / "static", static, scales)
    with pytest.raises(QuantError, match="input_activations") as e:
        load_model(out)
    assert "unexpected tensor" not in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("qc,field", [
    ({"bits": 8}, r"quantization_config\.bits 8 is not supported"),
    ({"symmetric": False}, r"quantization_config\.symmetric False is not supported"),
])
def test_int4_config_fields_we_do_not_write_are_refused(qc, field):
    with pytest.raises(QuantError, match=field):
        scheme_from_config({"quantization_config": {"quant_method": "canvaslm-int4", "group_size": 128, **qc}})


# 5.-8. config keys that change the model --------------------------------------------------------------

@pytest.fixture(scope="module")
def base_cfg(tiny):
    return json.loads((tiny / "config.json").read_text())


def _rp(c):
    return c["text_config"]["rope_parameters"]


CFG_CASES = {
    "theta0": (lambda c: _rp(c)["sliding_attention"].update(rope_theta=0),
               r"rope_parameters\['sliding_attention'\]\.rope_theta must be a finite number > 0, got 0"),
    "theta_neg": (lambda c: _rp(c)["full_attention"].update(rope_theta=-5.0),
                  r"rope_parameters\['full_attention'\]\.rope_theta must be a finite number > 0, got -5.0"),
    "theta_inf": (lambda c: _rp(c)["full_attention"].update(rope_theta=float("inf")), r"rope_theta must be a finite"),
    "prf_2": (lambda c: _rp(c)["full_attention"].update(partial_rotary_factor=2.0),
              r"rope_parameters\['full_attention'\]\.partial_rotary_factor must be in \(0, 1\], got 2.0"),
    "prf_neg": (lambda c: _rp(c)["full_attention"].update(partial_rotary_factor=-1),
                r"partial_rotary_factor must be in \(0, 1\], got -1"),
    "prf_0": (lambda c: _rp(c)["full_attention"].update(partial_rotary_factor=0), r"must be in \(0, 1\], got 0"),
    "prf_default": (lambda c: _rp(c)["sliding_attention"].update(partial_rotary_factor=0.5),
                    r"rope_parameters\['sliding_attention'\]\.partial_rotary_factor must be 1 with rope_type "
                    r"'default'"),
    "tie_top": (lambda c: c.update(tie_word_embeddings=False),
                r"config\.json: tie_word_embeddings is False; only tied word embeddings"),
    "tie_text": (lambda c: c["text_config"].update(tie_word_embeddings=False),
                 r"text_config\.tie_word_embeddings is False"),
    "rope_scaling": (lambda c: c["text_config"].update(rope_scaling={"rope_type": "linear", "factor": 8.0}),
                     r"text_config\.rope_scaling .* is not supported"),
    "v4_rope_theta": (lambda c: (c["text_config"].pop("rope_parameters"),
                                 c["text_config"].update(rope_theta=1.0, rope_local_base_freq=1.0)),
                      r"text_config\.rope_theta without text_config\.rope_parameters is not supported"),
    "moe_off": (lambda c: c["text_config"].update(enable_moe_block=False),
                r"text_config\.enable_moe_block=False is not supported"),
    "k_eq_v_false": (lambda c: c["text_config"].update(attention_k_eq_v=False),
                     r"text_config\.attention_k_eq_v=False is not supported"),
    "bias_str": (lambda c: c["text_config"].update(attention_bias="false"),
                 r"text_config\.attention_bias must be true or false, got 'false'"),
}


@pytest.mark.parametrize("name", sorted(CFG_CASES))
def test_config_keys_that_change_the_model_are_checked(base_cfg, name):
    mutate, msg = CFG_CASES[name]
    c = copy.deepcopy(base_cfg)
    mutate(c)
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict(c)


def test_config_values_the_reference_writes_still_load(base_cfg):
    c = copy.deepcopy(base_cfg)
    c["tie_word_embeddings"] = True
    c["text_config"].update(tie_word_embeddings=True, enable_moe_block=True, attention_k_eq_v=True,
                            rope_scaling=None, attention_bias=None, rope_theta=10_000.0)  # ignored with rope_parameters
    _rp(c)["sliding_attention"]["partial_rotary_factor"] = 1.0
    cfg = ModelConfig.from_dict(c)
    assert cfg.attention_bias is False and cfg.rope == ModelConfig.from_dict(base_cfg).rope
    c["text_config"].pop("rope_parameters")  # the reference's defaults
    c["text_config"].pop("rope_theta")
    assert ModelConfig.from_dict(c).rope["full_attention"].partial_rotary_factor == 0.25


def test_untied_checkpoint_is_refused_not_silently_tied(tiny, tmp_path):
    def untie(c):
        c["tie_word_embeddings"] = False
        c["text_config"]["tie_word_embeddings"] = False

    def head(t):
        t["lm_head.weight"] = torch.randn_like(t[[k for k in t if k.endswith("embed_tokens.weight")][0]])

    out = _copy(tiny, tmp_path / "untied", untie, head)
    with pytest.raises(ConfigError, match="tie_word_embeddings is False"):
        load_model(out)


# 9. dtype names ----------------------------------------------------------------------------------------

def test_save_sets_dtype_and_torch_dtype_alike(tiny, tmp_path):
    src = _copy(tiny, tmp_path / "src", lambda c: (c.update(torch_dtype="bfloat16", dtype="bfloat16"),
                                                   c["text_config"].update(torch_dtype="bfloat16")))
    out = save_model(load_model(src, dtype="float32"), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == cfg["text_config"]["torch_dtype"] == "float32"
    assert ck.stored_dtype(out) == "float32"


def test_vllm_dtype_names():
    assert parse_dtype("float") is torch.float32 and parse_dtype("half") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'double'"):
        parse_dtype("double")
    assert parse_dtype(torch.bfloat16) is torch.bfloat16 and parse_dtype(torch.float64) is torch.float64
    for bad in (torch.int32, torch.float8_e4m3fn, torch.bool):  # a cast to these destroyed the weights, and the
        with pytest.raises(ValueError, match=f"dtype {bad} cannot hold the weights"):  # run failed far later
            parse_dtype(bad)


def test_dtype_auto_in_quantize_and_memory(tiny, tmp_path, capsys):
    from canvaslm.cli import main

    assert main(["memory", str(tiny), "--gpu-memory", "24", "--dtype", "auto"]) == 0
    assert "GiB (bfloat16)" in capsys.readouterr().out
    assert main(["memory", str(tiny), "--gpu-memory", "24", "--dtype", "float"]) == 0
    assert main(["quantize", str(tiny), str(tmp_path / "q"), "--to", "int4", "--dtype", "auto"]) == 0
    stored = ck.stored_dtype(tiny)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == stored
    assert main(["quantize", str(tiny), str(tmp_path / "q2"), "--to", "fp8", "--dtype", "float"]) == 0
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["dtype"] == "float32"
