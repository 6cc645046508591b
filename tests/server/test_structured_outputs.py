"""vLLM's `structured_outputs` (v0.12+, where its guided_* fields went): each key gives exactly the output its
guided_* field gives (same seed, same tokens), errors name the key the request used, and keys this engine cannot
honour are refused rather than dropped; `SamplingParams(structured_outputs=...)` offline does the same."""

from __future__ import annotations

import json

import pytest

from canvaslm.generate import GenerationError
from canvaslm.llm import SamplingParams
from canvaslm.server.launch import BackgroundServer, build_state

openai = pytest.importorskip("openai")

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CASES = [({"choice": ["yes", "no"]}, {"guided_choice": ["yes", "no"]}),
         ({"regex": "[0-9]{3}"}, {"guided_regex": "[0-9]{3}"}),
         ({"json": SCHEMA}, {"guided_json": SCHEMA}),
         ({"json": json.dumps(SCHEMA)}, {"guided_json": SCHEMA}),
         ({"grammar": 'root ::= "a" | "b"'}, {"guided_grammar": 'root ::= "a" | "b"'}),
         ({"json_object": True, "disable_fallback": True}, {"response_format": {"type": "json_object"}})]


@pytest.fixture(scope="module")
def client(tiny_checkpoint, one_thread):
    with BackgroundServer(build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny")) as srv:
        yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("structured, guided", CASES)
def test_each_key_matches_its_guided_field(client, structured, guided):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=24, seed=3)
    got = client.chat.completions.create(**kw, extra_body={"structured_outputs": structured})
    if "response_format" in guided:
        want = client.chat.completions.create(**kw, response_format=guided["response_format"])
    else:
        want = client.chat.completions.create(**kw, extra_body=guided)
    assert got.choices[0].message.content == want.choices[0].message.content
    done = client.completions.create(model="tiny", prompt="q", max_tokens=24, seed=3,
                                     extra_body={"structured_outputs": structured})
    assert done.choices[0].text == client.completions.create(model="tiny", prompt="q", max_tokens=24, seed=3,
                                                             extra_body=guided).choices[0].text


def test_disable_additional_properties_closes_open_objects(client):
    """vLLM's rule: an object schema that lists properties gets additionalProperties false; a free-form object
    (no properties) and the branches of an allOf (each sees part of the object) stay as they are."""
    from canvaslm.sampling.json_schema import closed_objects

    open_schema = {"type": "object", "properties": {"o": {"type": "object"}, "p": {"type": "object", "properties": {
        "x": {"type": "integer"}}}}, "required": ["o", "p"]}
    closed = closed_objects(open_schema)
    assert closed["additionalProperties"] is False and closed["properties"]["o"] == {"type": "object"}
    assert closed["properties"]["p"]["additionalProperties"] is False
    both = {"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "integer"}}}]}
    assert closed_objects(both) == both  # closing each branch would reject every object with both keys
    # only schema positions: a property named "properties" (GeoJSON) and enum values stay as they are
    geo = {"type": "object", "properties": {"properties": {"type": "object", "properties": {}},
                                            "kind": {"enum": [{"type": "object", "properties": {}}]}}}
    closed = closed_objects(geo)
    assert set(closed["properties"]) == {"properties", "kind"} and closed["additionalProperties"] is False
    assert closed["properties"]["kind"] == {"enum": [{"type": "object", "properties": {}}]}
    assert closed["properties"]["properties"]["additionalProperties"] is False
    kw = dict(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=160, seed=3)
    want = client.chat.completions.create(**kw, extra_body={"guided_json": closed_objects(open_schema)})
    for schema in (open_schema, json.dumps(open_schema)):  # an object or its JSON text
        got = client.chat.completions.create(**kw, extra_body={"structured_outputs": {
            "json": schema, "disable_additional_properties": True}})
        assert set(json.loads(got.choices[0].message.content)) == {"o", "p"}  # no keys but the listed ones
        assert got.choices[0].message.content == want.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:  # the 400s name the key the request used
        client.chat.completions.create(**{**kw, "max_tokens": 40}, extra_body={
            "structured_outputs": {"regex": "[0-9]+"}, "max_time": 1.0})
    assert "max_time with structured_outputs.regex" in e.value.body["message"]


@pytest.mark.parametrize("structured, param, words", [
    ({"json": "{bad"}, "structured_outputs.json", "structured_outputs.json is not valid JSON"),
    ({"regex": "[a"}, "structured_outputs.regex", "structured_outputs.regex: cannot compile"),
    ({"structural_tag": "x"}, "structured_outputs.structural_tag", "is not supported"),
    ({"whitespace_pattern": " "}, "structured_outputs.whitespace_pattern", "is not supported"),
    ({"disable_any_whitespace": True}, "structured_outputs.disable_any_whitespace", "is not supported"),
    ({"regexx": "a"}, "structured_outputs", "Extra inputs are not permitted"),
    ({"json": "{bad", "disable_additional_properties": True}, "structured_outputs.json",
     "structured_outputs.json is not valid JSON"),
    ({"choice": ["a"], "json_object": True}, "structured_outputs.choice",
     "structured_outputs.choice and structured_outputs.json_object both constrain")])
def test_errors_name_the_key(client, structured, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=8,
                                       extra_body={"structured_outputs": structured})
    assert e.value.body["param"] == param and words in e.value.body["message"]
    assert "response_format" not in e.value.body["message"] and "guided_" not in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="both constrain the output"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=8,
                                       extra_body={"structured_outputs": {"choice": ["a"]}, "guided_choice": ["b"]})


def test_offline_structured_outputs(tiny_checkpoint):
    from canvaslm.llm import LLM

    tiny_llm = LLM(tiny_checkpoint, device="cpu")
    class Params:  # what vLLM's StructuredOutputsParams looks like to us: attributes
        json, regex, choice, grammar, json_object, whitespace_pattern, structural_tag = (SCHEMA, None, None, None,
                                                                                          None, None, None)

    base = dict(seed=2, max_new_tokens=24)
    for structured, ours in ((Params(), {"json_schema": SCHEMA}), ({"choice": ["x", "y"]}, {"choice": ("x", "y")}),
                             ({"json": json.dumps(SCHEMA)}, {"json_schema": SCHEMA}),
                             ({"json_object": True}, {"json_object": True})):
        sp = SamplingParams(**base, structured_outputs=structured)
        assert sp.structured_outputs is None and all(getattr(sp, k) == v for k, v in ours.items())
        want = tiny_llm.generate("q", SamplingParams(**base, **ours))[0].token_ids
        assert tiny_llm.generate("q", sp)[0].token_ids == want
    class Closed(Params):
        disable_additional_properties = True
        json = {"type": "object", "properties": {"o": {"type": "object", "properties": {}}}}

    assert SamplingParams(structured_outputs=Closed()).json_schema["properties"]["o"]["additionalProperties"] is False

    class Tight(Params):
        disable_any_whitespace = True

    with pytest.raises(GenerationError, match="disable_any_whitespace is not supported"):
        SamplingParams(structured_outputs=Tight())
    for bad, words in (({"structural_tag": "t"}, "'structural_tag' is not supported"), ({"jsonn": {}}, "'jsonn'"),
                       ({"json": "{"}, "not valid JSON")):
        with pytest.raises(GenerationError, match=words):
            SamplingParams(structured_outputs=bad)
    with pytest.raises(GenerationError, match="both set the output"):
        SamplingParams(structured_outputs={"regex": "a"}, regex="b")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [WEATHER], "tool_choice": "required", "extra_body": {"stop_token_ids": [5]}}, "stop_token_ids",
     "would cut a tool call's arguments"),
    ({"extra_body": {"guided_choice": ["yes", "no"], "ignore_eos": True}}, "ignore_eos", "cannot be combined"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"ignore_eos": True}}, "ignore_eos",
     "cannot be combined"),
    ({"extra_body": {"guided_choice": ["alpha", "beta"]}, "max_tokens": 3}, "guided_choice",
     "the longest choice needs 6 tokens (EOS included), over max_tokens=3"),
    ({"response_format": {"type": "json_object"}, "max_tokens": 10**12}, "max_tokens", "max_tokens=1000000000000"),
    ({"extra_body": {"guided_regex": "[a-z]+"}, "max_tokens": 10**7}, "max_tokens", "maximum context length"),
])
def test_outputs_the_constraint_cannot_keep_are_refused(client, extra, param, words):
    """What would break a constrained output's guarantee (a stop token inside a forced call, ignoring the EOS that
    ends it, a choice wider than max_tokens) is a 400 naming the field; a max_tokens over the context is refused
    before a slot that wide is built (it was a 500, or minutes of CPU)."""
    kw = {"max_tokens": 16, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], **kw)
    assert e.value.body["param"] == param and words in e.value.body["message"]
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=16,
                                        seed=1, extra_body={"guided_choice": ["alpha", "beta"]})
    assert ok.choices[0].message.content in ("alpha", "beta")
