"""Bad config.json / generation_config.json values: a ConfigError naming the file, the field and the value."""

from __future__ import annotations

import json
import shutil

import pytest

from canvaslm.config import ConfigError, DiffusionParams, ModelConfig
from canvaslm.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m")


def _variant(tiny, tmp_path, fname, edit):
    d = tmp_path / "v"
    shutil.copytree(tiny, d)
    data = json.loads((d / fname).read_text())
    edit(data)
    (d / fname).write_text(json.dumps(data))
    return d


def _text(key, value=None, drop=False):
    def edit(c):
        if drop:
            del c["text_config"][key]
        else:
            c["text_config"][key] = value
    return edit


def test_the_path_is_named_once(tiny, tmp_path):
    d = _variant(tiny, tmp_path, "config.json", _text("sliding_window", drop=True))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(d)
    assert str(e.value) == f"{d / 'config.json'}: text_config.sliding_window is required but missing"


def test_a_field_checked_by_the_dataclass_names_the_path_once(tiny, tmp_path):
    d = _variant(tiny, tmp_path, "config.json", _text("vocab_size", -5))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: text_config.vocab_size must be a positive integer")
    assert str(e.value).count("config.json") == 1


def _no_head_dim(c):
    del c["text_config"]["head_dim"]
    c["text_config"]["num_attention_heads"] = 0


@pytest.mark.parametrize("edit,field,value", [
    (_no_head_dim, "text_config.num_attention_heads", "0"),
    (_text("num_hidden_layers", "abc"), "text_config.num_hidden_layers", "'abc'"),
    (_text("num_key_value_heads", "x"), "text_config.num_key_value_heads", "'x'"),
    (_text("sliding_window", "x"), "text_config.sliding_window", "'x'"),
    (_text("rms_norm_eps", "x"), "text_config.rms_norm_eps", "'x'"),
    (_text("head_dim", 16.5), "text_config.head_dim", "16.5"),
    (_text("rope_parameters", {"sliding_attention": 5, "full_attention": 5}),
     "text_config.rope_parameters['full_attention']", "5"),
    (_text("rope_parameters", [1]), "text_config.rope_parameters", "[1]"),
    (_text("rope_parameters", {"sliding_attention": {"rope_theta": "x"}, "full_attention": {}}),
     "text_config.rope_parameters['sliding_attention'].rope_theta", "'x'"),
    (_text("per_layer_config", {"2": [1]}), "text_config.per_layer_config['2']", "[1]"),
    (_text("per_layer_config", [1]), "text_config.per_layer_config", "[1]"),
    (_text("per_layer_config", {"abc": {}}), "text_config.per_layer_config", "'abc'"),
    (_text("per_layer_config", {"2": {"head_dim": "32"}}), "text_config.per_layer_config['2'].head_dim", "'32'"),
    (_text("layer_types", "full_attention"), "text_config.layer_types", "'full_attention'"),
    (_text("eos_token_id", "abc"), "text_config.eos_token_id", "'abc'"),
    (_text("pad_token_id", "0"), "text_config.pad_token_id", "'0'"),
    (_text("vocab_size", True), "text_config.vocab_size", "True"),
    (_text("final_logit_softcapping", "x"), "text_config.final_logit_softcapping", "'x'"),
    (lambda c: c.update(canvas_length=0), "canvas_length", "0"),
    (lambda c: c.update(canvas_length="16"), "canvas_length", "'16'"),
    (lambda c: c.update(image_token_id="x"), "image_token_id", "'x'"),
])
def test_bad_config_values_name_the_file_and_field(tiny, tmp_path, edit, field, value):
    d = _variant(tiny, tmp_path, "config.json", edit)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'config.json'}: {field}"), msg
    assert value in msg, msg


@pytest.mark.parametrize("edit,field", [
    (lambda g: g.update(t_min="0.1"), "t_min"),
    (lambda g: g.update(confidence_threshold="x"), "confidence_threshold"),
    (lambda g: g.update(sampler_config={"entropy_bound": "x"}), "entropy_bound"),
    (lambda g: g.update(sampler_config=[1]), "sampler_config"),
    (lambda g: g.update(eos_token_id="x"), "eos_token_ids"),
    (lambda g: g.update(pad_token_id="x"), "pad_token_id"),
    (lambda g: g.update(stability_threshold=True), "stability_threshold"),
])
def test_bad_generation_values_name_the_file_and_field(tiny, tmp_path, edit, field):
    d = _variant(tiny, tmp_path, "generation_config.json", edit)
    with pytest.raises(ConfigError) as e:
        DiffusionParams.from_dir(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'generation_config.json'}: ") and field in msg, msg


def test_valid_variants_still_load(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.pop("canvas_length")
    text = cfg["text_config"]
    text.pop("head_dim")
    text.update(eos_token_id=1, final_logit_softcapping=None, rms_norm_eps=1e-5, unknown_key=3)
    m = ModelConfig.from_dict(cfg)
    assert m.canvas_length == 256 and m.head_dims[0] == 16 and m.eos_token_ids == (1,)
    assert m.final_logit_softcapping is None and m.rms_norm_eps == 1e-5
    text["per_layer_config"] = {2: {"head_dim": 32}}  # integer keys, as a YAML train config gives them
    assert ModelConfig.from_dict(cfg).head_dims == (16, 16, 32)
    assert DiffusionParams.from_dir(tiny).eos_token_ids == (1, 4)


def test_an_activation_the_text_model_does_not_run_is_refused(tiny, tmp_path):
    d = _variant(tiny, tmp_path, "config.json", _text("hidden_activation", "silu"))
    with pytest.raises(ConfigError, match=r"text_config.hidden_activation 'silu' is not supported"):
        ModelConfig.from_dir(d)


def test_a_config_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config.json: cannot read it"):
        ModelConfig.from_dir(tmp_path)


def test_generation_ids_outside_the_vocabulary_fail_at_load(tiny, tmp_path):
    from canvaslm.llm import LLM

    d = _variant(tiny, tmp_path, "generation_config.json", lambda g: g.update(eos_token_id=[1, 10**6]))
    with pytest.raises(ConfigError, match=r"generation config: eos_token_id \[1000000\] is outside the model's"):
        LLM(d, device="cpu")
