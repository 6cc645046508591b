"""Choice output (`SamplingParams.choice`, the server's `guided_choice`): the text is exactly one of the
choices whatever the seed, prompt or batch; bad choice lists get errors that name the field."""

from __future__ import annotations

import pytest

from canvaslm import SamplingParams
from canvaslm.sampling.choice import MAX_CHOICES, ChoiceConstraint
from canvaslm.sampling.constraints import ConstraintError

CHOICES = ["positive", "negative", "neutral", "mixed feelings", "n/a"]


def test_every_output_is_one_of_the_choices(tiny_llm):
    prompts = ["review: great", "review: awful", "x", "Classify this text please"]
    params = [SamplingParams(choice=CHOICES, seed=s, max_denoising_steps=3 + s % 3, temperature=0.5 + s / 4)
              for s in range(len(prompts))]
    outs = tiny_llm.generate(prompts, params)
    for o in outs:
        assert o.text in CHOICES and o.finish_reason == "stop", o.text
        assert o.token_ids[-1] in tiny_llm.eos_ids and tiny_llm.eos_ids[0] not in o.token_ids[:-1]
    # one canvas holds it, and a choice longer than a canvas still fits (the slot spans canvases)
    long = ["a" * 3 * tiny_llm.cfg.canvas_length, "b"]
    out = tiny_llm.generate("pick", SamplingParams(choice=long, seed=1, max_denoising_steps=2))[0]
    assert out.text in long


def test_the_constraint_layout_is_one_slot_then_eos(tiny_llm):
    c = ChoiceConstraint(["yes", "no"], tiny_llm.tokenizer)
    lay = c.layout(tiny_llm.cfg.canvas_length)
    assert lay.pinned == [-1] * c.width + [c.eos_id] and len(lay.slots) == 1
    assert c.width == len(tiny_llm.tokenizer.encode("yes", add_special_tokens=False))
    # "no" is padded with EOS to the slot's width: the output is cut right after it
    assert c.alternatives[1][-1] == c.eos_id


@pytest.mark.parametrize("choices,message", [
    ([], "must be a non-empty list"),
    ("yes", "must be a non-empty list"),
    (["yes", ""], r"choice\[1\] must be a non-empty string"),
    (["yes", 3], r"choice\[1\] must be a non-empty string"),
    (["yes", "no", "yes"], r"lists a choice twice: choice\[2\] = 'yes' is choice\[0\]"),
    ([f"c{i}" for i in range(MAX_CHOICES + 1)], "over the limit"),
])
def test_bad_choice_lists_are_named(tiny_llm, choices, message):
    with pytest.raises(ConstraintError, match=message):
        ChoiceConstraint(choices, tiny_llm.tokenizer)


def test_choice_excludes_other_constraints(tiny_llm):
    with pytest.raises(ValueError, match="set one of constraint, json_schema, json_object, choice"):
        tiny_llm.generate("x", SamplingParams(choice=["a", "b"], json_schema={"type": "boolean"}))
    with pytest.raises(ValueError, match="max_new_tokens=2 is below"):
        tiny_llm.generate("x", SamplingParams(choice=["mixed feelings", "b"], max_new_tokens=2))


def test_openai_client_guided_choice(client):
    import openai

    c, model = client
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "sentiment?"}], n=2, seed=3,
                                  extra_body={"guided_choice": CHOICES})
    assert all(ch.message.content in CHOICES and ch.finish_reason == "stop" for ch in r.choices)
    r = c.completions.create(model=model, prompt="label:", max_tokens=40, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    for body, needle in (({"guided_choice": []}, "guided_choice must be a non-empty list"),
                         ({"guided_choice": ["a", "a"]}, "lists a choice twice"),
                         ({"guided_choice": ["a", "b"], "response_format": {"type": "json_schema", "json_schema": {
                             "name": "x", "schema": {"type": "boolean"}}}}, "send one")):
        with pytest.raises(openai.BadRequestError, match=needle) as e:
            c.completions.create(model=model, prompt="x", extra_body=body)
        assert e.value.body["param"] == "guided_choice"


def test_cli_choice(tiny_llm, capsys):
    import json

    from canvaslm.cli import main

    d = str(tiny_llm.model_dir)
    assert main(["generate", d, "--prompt", "hi", "--choice", "yes", "--choice", "no way", "--seed", "2",
                 "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("yes", "no way")
    assert main(["generate", d, "--prompt", "hi", "--choice", "a", "--pin", "0:b"]) == 2
    assert "--choice and --pin cannot be combined" in capsys.readouterr().err
