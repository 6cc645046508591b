"""JSON-schema structured output: every output parses and validates; unsupported features are named."""

from __future__ import annotations

import json

import jsonschema
import pytest

from canvaslm.llm import SamplingParams
from canvaslm.sampling.constraints import ConstraintError
from canvaslm.sampling.json_schema import (JsonSchemaConstraint, JsonTemplateOptions, _Compiler,
                                           constraint_from_response_format)
from canvaslm.sampling.token_dfa import Vocab

SEEDS = list(range(6))


def _deep(n):
    s = {"type": "integer"}
    for i in range(n):
        s = {"type": "object", "properties": {f"k{i}": s, "z": {"type": "boolean"}}, "required": [f"k{i}"]}
    return s


SCHEMAS = {
    "flat": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}, "ok": {"type": "boolean"},
        "score": {"type": "number"}, "nothing": {"type": "null"}}, "required": ["name", "age"]},
    "shared_prefix_enums": {"type": "object", "properties": {
        "a": {"enum": ["ab", "abc", "abd"]}, "b": {"type": "string", "enum": ["x", "xy", "xyz", "y"]},
        "c": {"enum": [1, 12, 123, "1", True, None]}, "d": {"const": "fixed"}}},
    "deep": _deep(6),
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 3},
                 "minItems": 1, "maxItems": 2},
        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                       "maximum": 9}},
                 "minItems": 2, "maxItems": 2},
        "many": {"type": "array", "items": {"type": "boolean"}, "minItems": 4}}},
    "long_strings": {"type": "object", "properties": {
        "s1": {"type": "string", "minLength": 20, "maxLength": 40}, "s2": {"type": "string", "minLength": 5}},
        "additionalProperties": False},
    "ranges": {"type": "object", "properties": {
        "small": {"type": "integer", "minimum": -3, "maximum": 3},
        "big": {"type": "integer", "minimum": 100, "maximum": 99999},
        "excl": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
        "neg": {"type": "integer", "maximum": -5},
        "frac": {"type": "number", "minimum": -1.5, "maximum": 2.25}}},
    "top_level_array": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0}, "v": {"type": "string", "maxLength": 2}}}, "maxItems": 3},
    "top_level_string": {"type": "string", "maxLength": 5},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_parses_and_validates(tiny_llm, name):
    schema = SCHEMAS[name]
    steps = (1, 3, 8)[sorted(SCHEMAS).index(name) % 3]  # one step count per batch: see the report on mixed steps
    params = [SamplingParams(seed=s, max_denoising_steps=steps, json_schema=schema) for s in SEEDS]
    for r in tiny_llm.generate(["{"] * len(SEEDS), params):
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), schema)


def test_chat_prompt_and_temperature(tiny_llm):
    schema = SCHEMAS["flat"]
    prompt = tiny_llm.tokenizer.encode_chat([{"role": "user", "content": "json please"}])
    params = [SamplingParams(seed=s, temperature=2.0, max_denoising_steps=4, json_schema=schema) for s in range(3)]
    for r in tiny_llm.generate([prompt] * 3, params):
        jsonschema.validate(json.loads(r.text), schema)


def test_template_spans_canvases_and_ends_with_eos(tiny_llm):
    c = JsonSchemaConstraint(SCHEMAS["long_strings"], tiny_llm.tokenizer)
    lay = c.layout(16)
    assert lay.length > 3 * 16 and lay.pinned[-1] == tiny_llm.tokenizer.eos_ids[0]
    r = tiny_llm.generate("x", SamplingParams(seed=0, json_schema=SCHEMAS["long_strings"]))[0]
    assert r.token_ids[-1] == tiny_llm.tokenizer.eos_ids[0] and len(r.token_ids) == lay.length


def test_whole_slot_numbers_never_straddle_a_canvas(tiny_llm):
    c = JsonSchemaConstraint(SCHEMAS["ranges"], tiny_llm.tokenizer)
    for C in (12, 16, 24):
        for s in c.layout(C).slots:
            if s.finish is not None:
                assert s.start // C == (s.start + s.width - 1) // C
        assert c.min_new_tokens(C) <= c.max_template_tokens()
    with pytest.raises(ConstraintError, match="more than canvas_length=8"):
        c.layout(8)


def test_options_change_widths(tiny_llm):
    schema = {"type": "object", "properties": {"s": {"type": "string"}, "a": {
        "type": "array", "items": {"type": "integer"}}}}
    short = JsonSchemaConstraint(schema, tiny_llm.tokenizer, JsonTemplateOptions(string_tokens=4, array_items=1))
    long = JsonSchemaConstraint(schema, tiny_llm.tokenizer)
    assert short.template_tokens() < long.template_tokens()
    r = tiny_llm.generate("x", SamplingParams(seed=1, constraint=short))[0]
    out = json.loads(r.text)
    assert len(out["s"]) <= 4 and len(out["a"]) == 1


@pytest.mark.parametrize("schema,feature", [
    ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties"),
    ({"$ref": "#/definitions/x"}, "$ref"),
    ({"type": "string", "format": "color"}, "format"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     "additionalProperties"),  # a map beside listed properties
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required keys"),
    ({"type": "array", "minItems": 1}, "items"),
    ({"description": "anything", "properties": {}}, "'properties' is not supported"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "no integer"),
    ({"const": "caf\u00e9"}, "cannot tokenize"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "allOf members disagree on 'type'"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    # keywords of the wrong type are named, not a TypeError deep inside
    ({"type": "string", "maxLength": "x"}, "'maxLength' must be an integer >= 0, got 'x'"),
    ({"type": "string", "minLength": -1}, "'minLength' must be an integer >= 0"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 2.5}, "'maxItems' must be an integer"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": True}, "'minItems' must be an integer"),
    ({"type": "integer", "minimum": "0"}, "'minimum' must be a number, got '0'"),
    ({"type": "integer", "exclusiveMaximum": None}, "'exclusiveMaximum' must be a number"),
    ({"type": "number", "maximum": float("inf")}, "'maximum' must be a number"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "required": "a"}, "'required' must be a list"),
    ({"type": "integer", "maximum": 10**400}, "'maximum' is too large"),
    ({"type": "number", "minimum": -10**400}, "'minimum' is too large"),
    ({"type": "object", "properties": {"a": {"type": "integer", "exclusiveMaximum": 10**400}}},
     "'exclusiveMaximum' is too large, over the float range .at $.a."),
    ({"type": "string", "const": 5}, "no 'const' value fits"),
    ({"const": "a", "enum": ["b"]}, "no 'enum' / 'const' value fits"),
    ({"type": "integer", "enum": [20, 30], "maximum": 10}, "no 'enum' value fits the schema's other keywords .at $."),
    ({"type": "integer", "enum": [1], "maximum": "x"}, "'maximum' must be a number"),
])
def test_unsupported_features_raise_naming_them(tiny_llm, schema, feature):
    with pytest.raises(ConstraintError, match=feature.replace("$", r"\$").replace("^", r"\^")):
        JsonSchemaConstraint(schema, tiny_llm.tokenizer)


def test_response_format(tiny_llm):
    tok = tiny_llm.tokenizer
    assert constraint_from_response_format({"type": "text"}, tok, 100) is None
    rf = {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": SCHEMAS["flat"]}}
    c = constraint_from_response_format(rf, tok, None)
    r = tiny_llm.generate("x", SamplingParams(seed=2, constraint=c))[0]
    jsonschema.validate(json.loads(r.text), SCHEMAS["flat"])
    with pytest.raises(ConstraintError, match="over max_tokens=10"):
        constraint_from_response_format(rf, tok, 10)
    c = constraint_from_response_format({"type": "json_object"}, tok, 20)
    assert isinstance(json.loads(tiny_llm.generate("x", SamplingParams(seed=2, constraint=c))[0].text), dict)
    with pytest.raises(ConstraintError, match="'xml' is not supported"):
        constraint_from_response_format({"type": "xml"}, tok, None)
    with pytest.raises(ConstraintError, match="schema"):
        constraint_from_response_format({"type": "json_schema", "json_schema": {"name": "x"}}, tok, None)
    with pytest.raises(ConstraintError, match="patternProperties"):
        constraint_from_response_format({"type": "json_schema", "json_schema": {
            "schema": {"type": "object", "patternProperties": {}}}}, tok, None)


def test_max_template_tokens_bounds_every_canvas_length(tiny_llm):
    for schema in SCHEMAS.values():
        c = JsonSchemaConstraint(schema, tiny_llm.tokenizer)
        for C in range(12, 41):
            assert c.template_tokens() <= c.min_new_tokens(C) <= c.max_template_tokens()


@pytest.mark.parametrize("schema,kept", [
    ({"type": "integer", "enum": [1, 100], "maximum": 10}, [1]),
    ({"type": "integer", "enum": [0, 1, 2, 3.0, 2.5, True], "exclusiveMinimum": 0, "exclusiveMaximum": 3}, [1, 2]),
    ({"type": "number", "enum": [-1, 0.5, 7], "minimum": 0, "maximum": 1}, [0.5]),
    ({"type": "string", "enum": ["ok", "much too long", "", 3], "maxLength": 3, "minLength": 1}, ["ok"]),
    ({"const": 1, "enum": [True, 1.0]}, [1]),
    ({"const": True, "enum": [1, True]}, [True]),
    ({"type": "array", "items": {"type": "integer", "maximum": 5}, "maxItems": 2,
      "enum": [[1, 2], [1, 9], [1, 2, 3], "x"]}, [[1, 2]]),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False,
      "enum": [{"a": "x"}, {"a": 1}, {}, {"a": "y", "b": 1}]}, [{"a": "x"}]),
    ({"type": "object", "properties": {"a": {"enum": [1, 2]}}, "enum": [{"a": 2, "b": 0}, {"a": 3}]},
     [{"a": 2, "b": 0}]),
    ({"enum": [1, "1", None]}, [1, "1", None]),
])
def test_enum_and_const_keep_only_what_the_other_keywords_allow(tiny_llm, schema, kept):
    comp = _Compiler(Vocab.of(tiny_llm.tokenizer), JsonTemplateOptions())
    assert comp.choices(schema, "$", 0) == kept
    for v in kept:
        jsonschema.validate(v, schema)


def test_enum_next_to_bounds_outputs_only_valid_values(tiny_llm):
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "enum": [1, 100, 5], "maximum": 10},
        "s": {"type": "string", "enum": ["ok", "much too long"], "maxLength": 3}}}
    params = [SamplingParams(seed=s, max_denoising_steps=2, json_schema=schema) for s in range(4)]
    for r in tiny_llm.generate(["{"] * 4, params):
        jsonschema.validate(json.loads(r.text), schema)


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "boolean"}, "minItems": 10**9},
    {"type": "array", "items": {"const": 1}, "minItems": 10**9},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2000}, "minItems": 2000},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 10**9}}},
])
def test_huge_counts_are_refused_while_compiling(tiny_llm, schema):
    import time

    t = time.monotonic()
    with pytest.raises(ConstraintError, match="over the limit of 131072 tokens"):
        JsonSchemaConstraint(schema, tiny_llm.tokenizer)
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    with pytest.raises(ConstraintError, match=r"over max_tokens=16 \(at \$"):
        constraint_from_response_format(rf, tiny_llm.tokenizer, 16)
    assert time.monotonic() - t < 2


def test_repeated_items_make_the_same_template(tiny_llm):
    schema = {"type": "array", "items": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0}, "b": {"enum": ["x", "yz"]}, "c": {"type": "string", "maxLength": 2}}},
        "minItems": 3}
    c = JsonSchemaConstraint(schema, tiny_llm.tokenizer)
    item = JsonSchemaConstraint(schema["items"], tiny_llm.tokenizer)
    one, three = item.layout(1 << 30), c.layout(1 << 30)
    assert three.length == 2 + 3 * (one.length - 1) + 2 * 2 + 1  # [ ] , , and EOS
    assert [(s.width, s.dfa) for s in three.slots] == [(s.width, s.dfa) for s in one.slots] * 3
    r = tiny_llm.generate("x", SamplingParams(seed=0, constraint=c))[0]
    jsonschema.validate(json.loads(r.text), schema)
