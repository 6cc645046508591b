"""LoRA adapter inputs a review found mishandled (canvaslm/lora_serving.py, canvaslm/server/metrics.py):
peft inits that change the base weights and `lora_bias` are refused by name, adapter_model.bin adapters load,
`LLM(lora_modules=...)` takes every documented shape and names any other, `--lora-modules` takes vLLM's
JSON form, and hand-written /metrics escapes adapter names."""

from __future__ import annotations

import json

import pytest
import torch

from canvaslm.lora_serving import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, adapters_from, parse_lora_modules,
                                   read_adapter, write_adapter)

Q = "model.decoder.layers.0.self_attn.q_proj"
BIN_FILE = "adapter_model.bin"  # what peft's save_pretrained(safe_serialization=False) writes


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_checkpoint):
    """A rank-2 adapter on the tiny checkpoint's first q_proj."""
    from canvaslm.checkpoint import load_model

    lin = dict(load_model(tiny_checkpoint).named_modules())[Q]
    g = torch.Generator().manual_seed(0)
    return write_adapter(tmp_path_factory.mktemp("lora_review") / "ad", {Q: (
        torch.randn(2, lin.in_features, generator=g), torch.randn(lin.out_features, 2, generator=g))}, rank=2, alpha=2.0)


def _with_config(src, dst, **changes):
    """A copy of adapter `src` at `dst` with its adapter_config.json keys changed."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / CONFIG_FILE).read_text())
    (dst / CONFIG_FILE).write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "PiSSA"])
def test_inits_that_change_the_base_are_refused_by_name(adapter_dir, tmp_path, init):
    """Saved without conversion, such an adapter is right only on the base its init changed (logits ~10 off)."""
    d = _with_config(adapter_dir, tmp_path / "ad", init_lora_weights=init)
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE}: init_lora_weights='{init}' also changes the base "
                                           r"weights.*path_initial_model_for_weight_conversion"):
        read_adapter(d)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_keep_the_base_load(adapter_dir, tmp_path, init):
    """A converted PiSSA / OLoRA adapter is saved with init_lora_weights true."""
    assert read_adapter(_with_config(adapter_dir, tmp_path / "ad", init_lora_weights=init)).rank == 2


def test_lora_bias_is_refused_by_name(adapter_dir, tmp_path):
    d = _with_config(adapter_dir, tmp_path / "ad", lora_bias=True)
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE}: lora_bias=True is not served"):
        read_adapter(d)
    assert read_adapter(_with_config(adapter_dir, tmp_path / "off", lora_bias=False)).rank == 2


def test_a_bin_adapter_loads_as_its_safetensors_twin(adapter_dir, tmp_path):
    """peft's save_pretrained(safe_serialization=False) torch.saves the same state dict as adapter_model.bin."""
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "bin"
    shutil.copytree(adapter_dir, d)
    torch.save(load_file(str(d / WEIGHTS_FILE)), d / BIN_FILE)
    (d / WEIGHTS_FILE).unlink()
    got, want = read_adapter(d), read_adapter(adapter_dir)
    assert got.rank == want.rank and got.scale == want.scale and got.modules == want.modules
    assert all(torch.equal(a, b) for a, b in zip(got.weights[Q], want.weights[Q]))
    torch.save({"x": 1}, d / BIN_FILE)
    with pytest.raises(AdapterError, match=rf"{BIN_FILE}: expected a dict of tensors"):
        read_adapter(d)
    (d / BIN_FILE).write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match=rf"{BIN_FILE}: cannot read"):
        read_adapter(d)
    (d / BIN_FILE).unlink()
    with pytest.raises(AdapterError, match=rf"needs {CONFIG_FILE} and {WEIGHTS_FILE} \(or {BIN_FILE}\)"):
        read_adapter(d)


def test_adapters_from_takes_each_documented_shape(adapter_dir):
    json_entry = json.dumps({"name": "j", "path": str(adapter_dir)})
    for specs, names in (({"a": adapter_dir}, ["a"]), ([("a", str(adapter_dir))], ["a"]),
                         ([["a", adapter_dir]], ["a"]), ([f"a={adapter_dir}"], ["a"]), ([json_entry], ["j"]),
                         ([read_adapter(adapter_dir, "x"), ("y", adapter_dir)], ["x", "y"])):
        assert [a.name for a in adapters_from(specs)] == names, specs


@pytest.mark.parametrize("specs, bad", [
    (("a", "DIR"), "'a'"),  # one pair, not in a list
    ("DIR", "'DIR' names no adapter"),
    ({"a": None}, r"\('a', None\)"),
    ([42], "42"),
    ([("", "DIR")], r"\('', 'DIR'\)"),
    (["=DIR"], "got '=DIR'"),
])
def test_adapters_from_names_an_item_of_another_shape(specs, bad):
    with pytest.raises(AdapterError, match=bad):
        adapters_from(specs)


def test_llm_lora_modules_shapes(tiny_checkpoint, adapter_dir):
    """LLM(lora_modules=...) turned a lone pair or directory into IndexError, {name: None} into TypeError, and
    read "a=DIR" as the path '='."""
    from canvaslm.llm import LLM, GenerationError

    for specs in (("a", str(adapter_dir)), str(adapter_dir), {"a": None}):
        with pytest.raises(GenerationError, match=r"LLM\(lora_modules=\.\.\.\): .*a list of \(name, dir\) pairs"):
            LLM(tiny_checkpoint, device="cpu", lora_modules=specs)
    assert set(LLM(tiny_checkpoint, device="cpu", lora_modules=[f"a={adapter_dir}"]).loras) == {"a"}


def test_lora_modules_take_vllms_json_form():
    assert parse_lora_modules(['{"name": "a", "path": "/dir", "base_model_name": "model"}', "b=/d2",
                               ' {"name": "c", "path": "/d3"}']) == [("a", "/dir"), ("b", "/d2"), ("c", "/d3")]
    for entry, why in (('{"name": "a"}', "path must be a non-empty string, got None"),
                       ('{"name": "", "path": "/d"}', "name must be a non-empty string, got ''"),
                       ('{"name": "a", "path": "/d", "rank": 4}', r"unknown key\(s\) \['rank'\]"),
                       ('{"name": "a", "path": "/d", "base_model_name": 3}', "base_model_name must be a string"),
                       ('{"name": "a", path}', "is not valid JSON"),
                       ("oops", "NAME=DIR or a JSON object")):
        with pytest.raises(AdapterError, match="^--lora-modules: .*" + why):
            parse_lora_modules([entry])


def test_serve_reads_a_json_lora_module(adapter_dir, tmp_path, capsys):
    """The adapter is read (a bad one stops serve first); then the missing model is what fails."""
    from canvaslm.cli import main

    entry = json.dumps({"name": "a", "path": str(adapter_dir), "base_model_name": "m"})
    assert main(["serve", str(tmp_path / "missing-model"), "--lora-modules", entry]) == 2
    err = capsys.readouterr().err
    assert "missing-model" in err and "lora-modules" not in err, err


def test_hand_written_metrics_escape_label_values():
    """Without prometheus_client, an adapter named my"adapter broke the page and a newline could add lines."""
    from canvaslm.server.metrics import _render_by_hand

    names = ['my"adapter', "c:\\loras\\x", "two\nlines"]
    text = _render_by_hand([("lora_requests", "gauge", "Requests", [("", {"adapter": n}, 1) for n in names])])
    assert text.splitlines()[2:] == ['canvaslm_lora_requests{adapter="my\\"adapter"} 1.0',
                                     'canvaslm_lora_requests{adapter="c:\\\\loras\\\\x"} 1.0',
                                     'canvaslm_lora_requests{adapter="two\\nlines"} 1.0']
    parser = pytest.importorskip("prometheus_client.parser")
    [fam] = parser.text_string_to_metric_families(text)
    assert [s.labels["adapter"] for s in fam.samples] == names


def test_hand_written_counters_are_typed_under_their_sample_names():
    """A counter's samples are NAME_total: its HELP and TYPE lines name the same family (they named NAME, so a
    parser read an empty counter and untyped samples)."""
    from canvaslm.server.metrics import _render_by_hand

    text = _render_by_hand([("engine_steps", "counter", "Steps", [("_total", {}, 3)]),
                            ("running", "gauge", "Running", [("", {}, 1)])])
    assert text.splitlines()[:3] == ["# HELP canvaslm_engine_steps_total Steps",
                                     "# TYPE canvaslm_engine_steps_total counter", "canvaslm_engine_steps_total 3.0"]
    parser = pytest.importorskip("prometheus_client.parser")
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert fams["canvaslm_engine_steps"].type == "counter" and fams["canvaslm_engine_steps"].samples[0].value == 3.0
    assert fams["canvaslm_running"].type == "gauge"
