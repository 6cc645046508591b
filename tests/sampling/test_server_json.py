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
                         ({"guided_json": {"type": "string", "format": "color"}}, r"guided_json: .*format"),
                         ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "send one"),
                         ({"guided_json": SCHEMA, "response_format": _rf(SCHEMA)}, "send one")):
        with pytest.raises(openai.BadRequestError, match=needle) as e:
            c.chat.completions.create(model=model, messages=msgs, extra_body=body)
        assert e.value.body["param"] == "guided_json", e.value.body


def test_patterns_compile_under_the_servers_limit_and_busy_compilers_are_a_503(client, monkeypatch):
    """A schema's `pattern` / `format` compiles in a regex child under --regex-timeout, as guided_regex does; when
    every compiler stays taken the request gets a 503 (try again), not a 500."""
    import openai

    from canvaslm.sampling import regex_fsm

    c, model = client
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                               "day": {"type": "string", "format": "date"}}}
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], response_format=_rf(schema))
    out = json.loads(r.choices[0].message.content)
    jsonschema.validate(out, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert len(out["code"]) == 4

    def busy(pattern, timeout):
        raise regex_fsm.RegexCompileBusy("2 regex compiles are already running; try again")

    monkeypatch.setattr(regex_fsm, "char_fsm_with_deadline", busy)
    import canvaslm.sampling.json_schema as js

    monkeypatch.setattr(js, "char_fsm_with_deadline", busy)
    fresh = {"type": "string", "pattern": "^x[0-9]{3}$"}  # not compiled before: no cached automaton
    with pytest.raises(openai.InternalServerError, match="already running") as e:
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], response_format=_rf(fresh))
    assert e.value.status_code == 503
