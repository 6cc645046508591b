"""response_format json_schema end to end: the official `openai` client against the CanvasLM server
(engine runner path); unsupported schemas get a 400 naming the feature."""

from __future__ import annotations

import json

import jsonschema
import pytest

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "minimum": 0},
    "capital": {"type": "boolean"}, "size": {"enum": ["small", "smaller", "smallest"]},
    "coords": {"type": "array", "items": {"type": "number", "minimum": -180, "maximum": 180},
               "minItems": 2, "maxItems": 2}}, "required": ["city"]}


def _rf(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": schema}}


def test_openai_client_json_schema_outputs_validate(client):
    c, model = client
    for seed in range(3):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "a city as JSON"}],
                                      response_format=_rf(SCHEMA), seed=seed, temperature=1.0 + seed / 2)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=model, prompt="{", extra_body={"response_format": _rf(SCHEMA)})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_openai_client_unsupported_schema_is_a_400_naming_the_feature(client):
    import openai

    c, model = client
    bad = {"type": "object", "patternProperties": {"^x": {"type": "string"}}}
    with pytest.raises(openai.BadRequestError, match="patternProperties"):
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                  response_format=_rf(bad))


def test_guided_json_is_the_same_constraint(client):
    """vLLM's `guided_json` (a schema object, or its JSON text) gives what response_format json_schema
    gives for the same seed."""
    import openai

    c, model = client
    msgs = [{"role": "user", "content": "a city as JSON"}]
    want = c.chat.completions.create(model=model, messages=msgs, response_format=_rf(SCHEMA), seed=7)
    for schema in (SCHEMA, json.dumps(SCHEMA)):
        r = c.chat.completions.create(model=model, messages=msgs, seed=7, extra_body={"guided_json": schema})
        assert r.choices[0].message.content == want.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    for body, needle in (({"guided_json": "{not json"}, "guided_json is not valid JSON"),
                         ({"guided_json": "[1]"}, "must be a JSON schema object"),
                         ({"guided_json": {"type": "string", "pattern": "a"}}, r"guided_json: .*pattern"),
                         ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "send one"),
                         ({"guided_json": SCHEMA, "response_format": _rf(SCHEMA)}, "send one")):
        with pytest.raises(openai.BadRequestError, match=needle) as e:
            c.chat.completions.create(model=model, messages=msgs, extra_body=body)
        assert e.value.body["param"] == "guided_json", e.value.body
