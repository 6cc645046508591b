"""Offline API review (session 28): structured_outputs of no known shape and a non-bool json_object are refused
(they were dropped, or turned JSON mode on); infill and edit read generation_config.json's max_length as generate
does, and name a params of the wrong type; lora_modules and max_batch of the wrong type are named errors."""

from __future__ import annotations

import json

import pytest

from canvaslm.generate import GenerationError
from canvaslm.infill import default_gaps
from canvaslm.llm import LLM, SamplingParams
from canvaslm.testing import make_tiny_checkpoint


@pytest.mark.parametrize("value", ['{"type": "integer"}', ["yes", "no"], 42])
def test_structured_outputs_of_no_known_shape_are_refused(value):
    with pytest.raises(GenerationError, match="SamplingParams.structured_outputs must be a dict"):
        SamplingParams(structured_outputs=value)  # was dropped: the output ran unconstrained


def test_structured_outputs_objects_are_read_by_attribute():
    class Params:  # vLLM's StructuredOutputsParams, duck-typed
        json, regex, choice, grammar, json_object = None, None, ["a", "b"], None, None

    assert SamplingParams(structured_outputs=Params()).choice == ("a", "b")


@pytest.mark.parametrize("value", ["no", 1, None])
def test_json_object_must_be_a_bool(value):
    with pytest.raises(GenerationError, match="SamplingParams.json_object must be true or false"):
        SamplingParams(json_object=value)
    with pytest.raises(GenerationError, match="json_object must be true or false"):
        SamplingParams(structured_outputs={"json_object": "yes"})


@pytest.fixture(scope="module")
def short_llm(tmp_path_factory):
    """A checkpoint whose generation_config.json gives max_length (prompt + output) and no max_new_tokens."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("max_length"))
    gen = json.loads((path / "generation_config.json").read_text())
    gen.pop("max_new_tokens", None)
    gen["max_length"] = 20
    (path / "generation_config.json").write_text(json.dumps(gen))
    return LLM(path, device="cpu", progress=False)


def test_infill_and_edit_read_max_length_as_generate_does(short_llm):
    llm = short_llm
    prompt = llm.tokenizer.encode("abcd")
    out = llm.generate([prompt], SamplingParams(seed=0))[0]
    assert len(prompt) + len(out.token_ids) <= 20
    suffix = llm.tokenizer.encode("wxyz", add_special_tokens=False)
    r = llm.infill("abcd", "wxyz", SamplingParams(seed=0, max_denoising_steps=2))
    need = len(suffix) + 1  # the suffix and its EOS
    assert set(r.scores) == set(default_gaps(20 - len(prompt) - need))  # were gaps up to 250: 256 new tokens
    e = llm.edit("abcdefgh", 2, 4, SamplingParams(seed=0, max_denoising_steps=2))
    assert max(e.scores) <= 20
    with pytest.raises(GenerationError, match="max_length=20 .* leaves no room"):
        llm.infill("a" * 40, "b", SamplingParams(seed=0))


def test_wrong_argument_types_are_named(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", progress=False)
    for call in (lambda: llm.infill("a", "b", [SamplingParams()]), lambda: llm.edit("abc", 1, 2, [SamplingParams()])):
        with pytest.raises(GenerationError, match="infill: params must be a SamplingParams, got list"):
            call()
    with pytest.raises(GenerationError, match=r"LLM\(lora_modules=...\): 5 names no adapter"):
        LLM(tiny_checkpoint, device="cpu", lora_modules=5)
    with pytest.raises(GenerationError, match=r"LLM\(max_batch=True\): expected an int >= 1"):
        LLM(tiny_checkpoint, device="cpu", max_batch=True)
