"""JSON schemas as pydantic and the openai client write them: $ref / $defs, allOf of one, anyOf / oneOf and
'type' lists of scalars (Optional[int], int | str), Optional[Model], recursion. Every output must pass
`Model.model_validate_json`; what the template cannot hold is refused by name."""

from __future__ import annotations

import datetime
import json
import re
import time
import uuid
from enum import Enum
from typing import Literal, Optional

import jsonschema
import pytest
from pydantic import BaseModel, Field

from canvaslm.llm import SamplingParams
from canvaslm.sampling.constraints import ConstraintError
from canvaslm.sampling.json_schema import JsonSchemaConstraint, JsonTemplateOptions, constraint_from_response_format
from canvaslm.sampling.token_dfa import Vocab, dfa_accepts

from . import test_bpe

bpe_model = test_bpe.bpe  # test_bpe.py's `bpe` fixture: a byte-level BPE vocabulary with multi-character tokens

SMALL = JsonTemplateOptions(string_tokens=5, integer_tokens=4, number_tokens=5, array_items=2)


class Color(str, Enum):
    red = "red"
    green = "green"


class Address(BaseModel):
    street: str = Field(max_length=6)
    zip: Optional[int] = None


class Person(BaseModel):
    name: str = Field(max_length=5)
    age: Optional[int] = None
    nick: Optional[str] = Field(default=None, max_length=4)
    color: Color
    kind: Literal["a", "bc"]
    either: int | str
    score: Optional[float] = Field(default=None, ge=0, le=1000)
    home: Address = Field(description="where they live")  # a $ref with a sibling annotation
    others: list[Address] = Field(max_length=2)
    work: Optional[Address] = None


class Order(BaseModel):
    item: Address = Field(description="what")
    qty: Optional[int]
    color: Optional[Color]


class Node(BaseModel):
    value: int
    next: Optional["Node"] = None
    kids: list["Node"] = []


class Loop(BaseModel):  # a recursion that cannot stop: refused
    value: int
    child: "Loop"


def _outputs(llm, schema, seeds=range(3), steps=(1, 4)):
    c = JsonSchemaConstraint(schema, llm.tokenizer, SMALL)
    params = [SamplingParams(seed=s, max_denoising_steps=steps[s % len(steps)], temperature=1.0 + s / 2,
                             constraint=c) for s in seeds]
    out = llm.generate(["{"] * len(params), params)
    assert all(r.finish_reason == "stop" for r in out)
    return [r.text for r in out]


@pytest.mark.parametrize("model", [Person, Node, Address])
def test_pydantic_outputs_validate(tiny_llm, model):
    schema = model.model_json_schema()
    for text in _outputs(tiny_llm, schema, seeds=range(2 if model is Person else 3)):
        model.model_validate_json(text)
        jsonschema.validate(json.loads(text), schema)


def test_openai_strict_and_tool_schemas_validate(tiny_llm):
    """The schemas openai's parse() and pydantic_function_tool() send (strict: every field required,
    additionalProperties false, defaults dropped)."""
    openai = pytest.importorskip("openai")
    from openai.lib._pydantic import to_strict_json_schema

    for schema in (to_strict_json_schema(Order), openai.pydantic_function_tool(Order)["function"]["parameters"]):
        for text in _outputs(tiny_llm, schema, seeds=range(2)):
            Order.model_validate_json(text)
            jsonschema.validate(json.loads(text), schema)


def test_unions_and_refs_validate_with_bpe(bpe_model):
    """Multi-character tokens across a union slot's parts (an opening quote with letters, digits then spaces)."""
    tok, model = bpe_model
    schema = {"type": "object", "properties": {
        "name": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
        "age": {"type": ["integer", "string"], "minimum": 0, "maximum": 500, "minLength": 2},
        "kind": {"oneOf": [{"$ref": "#/$defs/k"}, {"type": "boolean"}]},
        "tags": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/k"}, "maxItems": 2}, {"type": "null"}]}},
        "$defs": {"k": {"enum": ["ab", "abc", "abd"]}}}
    c = JsonSchemaConstraint(schema, tok, JsonTemplateOptions(string_tokens=8))  # a clamped slot fits a canvas
    for o in test_bpe._run(model, tok, c, range(6), c.min_new_tokens(model.cfg.canvas_length)):
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(tok.decode(o.token_ids)), schema)


def test_union_of_objects_validates_with_bpe(bpe_model):
    """Multi-character tokens in a union of object templates (keys spelled by several-character tokens, a free
    value that runs as long as it likes)."""
    tok, model = bpe_model
    schema = {"type": "object", "properties": {"x": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}}},
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "boolean"}}}},
        {"type": "object"}, {"type": "number"}]}}}
    c = JsonSchemaConstraint(schema, tok, JsonTemplateOptions(string_tokens=6, free_tokens=8))
    for o in test_bpe._run(model, tok, c, range(6), c.min_new_tokens(model.cfg.canvas_length)):
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(tok.decode(o.token_ids)), schema)


def test_union_slot_takes_every_alternative(tiny_llm):
    """One slot for Optional[int] / int | str / a type list: its automaton takes each alternative's values
    (padded) and nothing else."""
    tok = tiny_llm.tokenizer
    vocab = Vocab.of(tok)
    cases = {
        "opt_int": ({"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}, ["12", "-3", "null"],
                    ['"a"', "1.5", "nul", "true"]),
        "int_or_str": ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, ["7", '"ab"', '""'],
                       ['"abcd"', "null", '"a']),
        "type_list": ({"type": ["string", "null", "boolean"], "minLength": 2}, ['"ab"', "null", "false"],
                      ['"a"', "0"]),
        "one_of": ({"oneOf": [{"const": "x"}, {"enum": [1, 2]}, {"type": "boolean"}]}, ['"x"', "1", "true"],
                   ['"y"', "null", "2.5"]),
        "nested": ({"anyOf": [{"anyOf": [{"type": "boolean"}, {"type": "null"}]}, {"$ref": "#/$defs/s"}],
                    "$defs": {"s": {"type": "string", "maxLength": 2}}}, ["true", "null", '"xy"'], ['"xyz"', "1"]),
    }
    for name, (schema, good, bad) in cases.items():
        c = JsonSchemaConstraint(schema, tok, SMALL)
        [(width, dfa, _)] = c.pieces
        for text in good + bad:
            ids = vocab.encode(text)
            ids += [vocab.pad_id] * (width - len(ids))
            assert dfa_accepts(dfa, ids) == (text in good), (name, text)


def test_bounded_number_in_a_union_is_clamped_only_as_a_number(tiny_llm):
    tok = tiny_llm.tokenizer
    vocab = Vocab.of(tok)
    schema = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "null"}]}
    [(width, dfa, finish)] = JsonSchemaConstraint(schema, tok, SMALL).pieces
    assert finish is not None
    for text, want in (("5000", "1000"), ("42", "42"), ("null", "null")):
        ids = vocab.encode(text) + [vocab.pad_id] * (width - len(vocab.encode(text)))
        out = finish(ids)
        assert len(out) == width and vocab.text(out).strip() == want
    for seed in range(4):
        r = tiny_llm.generate("{", SamplingParams(seed=seed, max_denoising_steps=2, json_schema=schema))[0]
        jsonschema.validate(json.loads(r.text), schema)


def test_refs(tiny_llm):
    tok = tiny_llm.tokenizer
    schema = {"type": "object", "properties": {
        "a": {"$ref": "#/definitions/x~1y"}, "b": {"$ref": "#/$defs/t~0"}, "c": {"allOf": [{"$ref": "#/$defs/t~0"}]},
        "d": {"$ref": "#/properties/a", "title": "same as a"}},
        "definitions": {"x/y": {"type": "integer", "minimum": 0, "maximum": 3}}, "$defs": {"t~": {"const": "k"}}}
    for text in _outputs(tiny_llm, schema, seeds=range(2)):
        v = json.loads(text)
        jsonschema.validate(v, schema)
        assert v["b"] == v["c"] == "k"
    for bad, needle in (({"$ref": "#/$defs/nope"}, "'#/\\$defs/nope' points at nothing"),
                        ({"$ref": "https://example.com/s.json"}, "'https://example.com/s.json' is not supported"),
                        ({"$ref": "#/$defs/a", "type": "string", "$defs": {"a": {}}}, "'type' next to '\\$ref'"),
                        ({"allOf": [{"type": "string"}, {"anyOf": [{"maxLength": 2}]}]}, "a union inside an allOf"),
                        ({"anyOf": []}, "'anyOf' must be a non-empty list")):
        with pytest.raises(ConstraintError, match=needle):
            JsonSchemaConstraint(bad, tok)


def test_recursion_stops_at_null_or_empty_array_else_is_refused_by_name(tiny_llm):
    c = JsonSchemaConstraint(Node.model_json_schema(), tiny_llm.tokenizer, SMALL)
    text = "".join(p for p in (tiny_llm.tokenizer.decode(p) if isinstance(p, list) else "#" for p in c.pieces))
    assert '"next": null, "kids": []' in text
    with pytest.raises(ConstraintError, match="recursive \\$ref #/\\$defs/Loop -> #/\\$defs/Loop"):
        JsonSchemaConstraint(Loop.model_json_schema(), tiny_llm.tokenizer)
    with pytest.raises(ConstraintError, match="recursive \\$ref # -> #"):
        JsonSchemaConstraint({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, tiny_llm.tokenizer)


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    name: str = Field(max_length=4)
    age: int


class Pet(BaseModel):  # a tagged union (oneOf + discriminator), a union of an array with a string, Optional of a union
    pet: Cat | Dog = Field(discriminator="kind")
    tags: list[int] | str
    other: Optional[Cat | Dog] = None


def test_unions_of_objects_and_arrays_validate(tiny_llm):
    """Cat | Dog, list[int] | str, Optional[Cat | Dog], a 'type' list with an object: one slot taking any
    alternative's whole template; every output validates, and both kinds of pet get written."""
    schema = Pet.model_json_schema()
    assert "discriminator" in schema["properties"]["pet"]  # pydantic's tag, read as the annotation it is
    kinds = set()
    for text in _outputs(tiny_llm, schema, seeds=range(8)):
        pet = Pet.model_validate_json(text)
        jsonschema.validate(json.loads(text), schema)
        kinds.add(pet.pet.kind)
    assert kinds == {"cat", "dog"}
    for schema in ({"type": ["string", "object"]},
                   {"type": "object", "properties": {"a": {"anyOf": [{"type": "array", "items": {}},
                                                                     {"type": "integer"}]}}}):
        for text in _outputs(tiny_llm, schema, seeds=range(2)):
            jsonschema.validate(json.loads(text), schema)


def test_union_of_templates_takes_each_alternative_and_no_mix(tiny_llm):
    """The slot's automaton takes each alternative's template, with its values, padded, and not one that mixes
    two alternatives' keys or leaves a key out."""
    tok = tiny_llm.tokenizer
    vocab = Vocab.of(tok)
    schema = {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"type": "object", "properties": {"b": {"type": "string", "maxLength": 2}}},
                        {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}]}
    [(width, dfa, finish)] = JsonSchemaConstraint(schema, tok, SMALL).pieces
    assert finish is None
    good = ['{"a": 12}', '{"a": -3  }', '{"b": "xy"}', '[true, false]']
    bad = ['{"a": "x"}', '{"b": 1}', '{"a": 1, "b": "x"}', '{}', '[true]', '{"b": "xyz"}', 'null']
    for text in good + bad:
        ids = vocab.encode(text)
        ids += [vocab.pad_id] * (width - len(ids))
        assert dfa_accepts(dfa, ids) == (text in good), text


def test_bounded_number_inside_a_union_of_objects_is_clamped(tiny_llm):
    """A bounded number in one alternative keeps its repair: the union slot clamps it in place."""
    tok = tiny_llm.tokenizer
    vocab = Vocab.of(tok)
    schema = {"anyOf": [{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 1000}}},
                        {"type": "string", "maxLength": 3}]}
    [(width, dfa, finish)] = JsonSchemaConstraint(schema, tok, SMALL).pieces
    assert finish is not None
    for text, want in (('{"n": 5000}', {"n": 1000}), ('{"n": 42  }', {"n": 42}), ('"ab"', "ab")):
        ids = vocab.encode(text)
        ids += [vocab.pad_id] * (width - len(ids))
        out = finish(ids)
        assert len(out) == width and dfa_accepts(dfa, out) and json.loads(vocab.text(out)) == want
    assert not dfa_accepts(dfa, vocab.encode('{"n": 42}') + [vocab.pad_id] * 2)  # a repaired slot keeps its width
    for seed in range(3):
        r = tiny_llm.generate("{", SamplingParams(seed=seed, max_denoising_steps=2, json_schema=schema))[0]
        jsonschema.validate(json.loads(r.text), schema)


def test_union_alternatives_keep_length_bounds_and_compile_fast(tiny_llm):
    """Inside a template union a value may run past its own template width, so bounds its width stood for are
    kept: a maxLength the slot could never reach (also a scalar union's, in an alternative) keeps the slot at its
    width, and a huge maxLength costs no automaton states (it was one state per character: 10k states, 10 s)."""
    tok = tiny_llm.tokenizer
    vocab = Vocab.of(tok)
    closed = lambda p: {"type": "object", "properties": p, "required": list(p), "additionalProperties": False}  # noqa
    schema = {"anyOf": [closed({"s": {"anyOf": [{"type": "string", "minLength": 28, "maxLength": 30},
                                                {"type": "null"}]}}), closed({"t": {"type": "object"}})]}
    [(width, dfa, _)] = JsonSchemaConstraint(schema, tok).pieces
    for n, ok in ((28, True), (50, False)):
        ids = vocab.encode('{"s": "' + "a" * n + '"}')
        assert dfa_accepts(dfa, ids + [vocab.pad_id] * (width - len(ids))) == ok, n
    for text in _outputs(tiny_llm, schema, seeds=range(3)):
        jsonschema.validate(json.loads(text), schema)
    big = {"anyOf": [closed({"kind": {"const": "a"}, "body": {"type": "string", "maxLength": 50000}}),
                     closed({"kind": {"const": "b"}, "n": {"type": "integer"}})]}
    t = time.monotonic()
    [(width, dfa, _)] = JsonSchemaConstraint(big, tok).pieces
    assert time.monotonic() - t < 5 and dfa.num_states < 2000


def test_one_of_alternatives_that_may_share_a_value_are_refused(tiny_llm):
    """A value two oneOf alternatives both take is invalid under oneOf; with templates that is every output when
    nothing tells the objects apart, so such a oneOf is refused, naming both; a tagged one compiles."""
    tok = tiny_llm.tokenizer
    loose = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                       {"type": "object", "properties": {"b": {"type": "boolean"}}}]}
    with pytest.raises(ConstraintError, match=r"'oneOf' alternatives \$\.oneOf\[0\] and \$\.oneOf\[1\] may both"):
        JsonSchemaConstraint(loose, tok)
    for overlap in ({"oneOf": [{"type": "array", "items": {"type": "integer"}},  # ints are numbers
                               {"type": "array", "items": {"type": "number"}}]},
                    {"oneOf": [{"const": "x"}, {"enum": [1, 2]}, {"type": "number"}]}):  # scalars alike
        with pytest.raises(ConstraintError, match="may both take one value"):
            JsonSchemaConstraint(overlap, tok)
    apart = [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False},
             {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
             {"type": "array", "items": {"type": "integer"}}, {"type": "string"}]
    for text in _outputs(tiny_llm, {"oneOf": apart}, seeds=range(4)):
        jsonschema.validate(json.loads(text), {"oneOf": apart})


def test_a_lower_bound_of_zero_needs_no_clamp(tiny_llm):
    """minimum 0 (pydantic's ge=0): the automaton has no '-' at all, so the slot is not repaired as a whole,
    need not sit in one canvas, and leaves a union of objects free to span canvases."""
    tok = tiny_llm.tokenizer
    [(_, _, finish)] = JsonSchemaConstraint({"type": "integer", "minimum": 0}, tok).pieces
    assert finish is None
    assert JsonSchemaConstraint({"type": "integer", "minimum": 0, "maximum": 10**6}, tok).pieces[0][2] is not None
    wide = {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"},
                                                        "n": {"type": "integer", "minimum": 0}}},
                      {"type": "null"}, {"type": "string"}]}
    c = constraint_from_response_format({"type": "json_schema", "json_schema": {"name": "w", "schema": wide}}, tok,
                                        None, canvas_length=16)
    assert c.pieces[0][0] > 16 and c.pieces[0][2] is None
    for text in _outputs(tiny_llm, wide, seeds=range(3)):
        jsonschema.validate(json.loads(text), wide)


class Event(BaseModel):  # what pydantic writes for dates, times, ids and constrained strings
    when: datetime.datetime
    day: Optional[datetime.date]
    id: uuid.UUID
    code: str = Field(pattern=r"^[A-Z]{3}-\d{3}$")
    loose: str = Field(pattern=r"ab", max_length=6)  # JSON schema's pattern matches anywhere


def test_pattern_and_format_strings_validate(tiny_llm):
    """`pattern` (matched anywhere unless anchored, as JSON schema reads it) and the common `format`s (date-time,
    date, uuid, ...) are a string slot whose content matches them whole, sized to the longest match; every output
    validates under pydantic and jsonschema's format checker, and a slot refuses what the pattern refuses."""
    schema = Event.model_json_schema()
    for text in _outputs(tiny_llm, schema, seeds=range(4)):
        Event.model_validate_json(text)
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    tok = tiny_llm.tokenizer
    vocab = Vocab.of(tok)
    c = JsonSchemaConstraint({"type": "string", "pattern": "^[A-Z]{3}-\\d{3}$"}, tok)
    [_, (width, dfa, _)] = c.pieces
    for text, ok in (('ABC-123"', True), ('AB-123"', False), ('abc-123"', False), ('ABC-1234"', False)):
        ids = vocab.encode(text)
        assert dfa_accepts(dfa, ids + [vocab.pad_id] * (width - len(ids))) == ok, text
    from pydantic import AnyUrl, TypeAdapter

    strict = {"time": TypeAdapter(datetime.time), "uri": TypeAdapter(AnyUrl)}  # formats jsonschema leaves unchecked
    for fmt in ("email", "ipv4", "hostname", "uri", "time"):
        schema = {"type": "object", "properties": {"v": {"type": "string", "format": fmt}}}
        for text in _outputs(tiny_llm, schema, seeds=range(2)):
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
            if fmt in strict:
                strict[fmt].validate_python(json.loads(text)["v"])
    for bad, needle in (({"type": "string", "format": "color"}, "format 'color' is not supported"),
                        ({"type": "string", "pattern": "(a"}, "'pattern'"),
                        ({"type": "string", "pattern": '^"$'}, "no string that matches"),  # needs an escape
                        ({"type": "string", "pattern": "^a{40}$", "maxLength": 10}, "no string that matches"),
                        ({"type": "string", "pattern": "a", "format": "date"}, "together")):
        with pytest.raises(ConstraintError, match=needle):
            JsonSchemaConstraint(bad, tok)


class Inventory(BaseModel):  # maps: additionalProperties as a schema
    counts: dict[str, int]
    tags: dict[str, list[Color]]
    maybe: Optional[dict[str, float]] = None


def test_pattern_reviews_alternations_unions_enums_and_classes(tiny_llm):
    """From a review: an unanchored word list compiles as one `.*(?:a|b|...).*` (one `.*` pair per word grew
    exponentially: ten words took over 30 s); a union none of whose strings fits its slot is refused when
    compiled (it failed at commit, a 500); enum values are checked by the pattern's automaton, in linear time
    (`^(a+)+$` took Python's re seconds); \\W and \\D take only what every regex reading calls non-word / non-digit,
    and a negated class with \\w or \\d is refused; a refusal names the pattern as the schema wrote it."""
    tok = tiny_llm.tokenizer
    words = "|".join(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa", "lambda"])
    t = time.monotonic()
    JsonSchemaConstraint({"type": "string", "pattern": words}, tok)
    enum = {"type": "string", "enum": ["a" * 28 + "!", "aa"], "pattern": "^(a+)+$"}
    [piece] = JsonSchemaConstraint(enum, tok).pieces
    assert time.monotonic() - t < 5 and tok.decode(piece) == '"aa"'
    dead = {"anyOf": [{"type": "string", "pattern": '^"$'}, {"type": "string", "pattern": "^a{40}$", "maxLength": 10}]}
    with pytest.raises(ConstraintError, match="no value of the union fits"):
        JsonSchemaConstraint(dead, tok)
    with pytest.raises(ConstraintError, match=r"^json_schema: 'pattern' '\[\^.*negated class"):  # as written
        JsonSchemaConstraint({"type": "string", "pattern": "[^\\w]"}, tok)
    nonword = {"type": "object", "properties": {"v": {"type": "string", "pattern": "^\\W+\\D$"}}}
    for text in _outputs(tiny_llm, nonword, seeds=range(3)):
        value = json.loads(text)["v"]
        assert all(ord(c) < 128 for c in value) and re.fullmatch(r"\W+\D", value)


def test_sampling_params_take_a_pydantic_model_or_the_schemas_json(tiny_llm):
    """SamplingParams(json_schema=Model) takes the model's schema (as `client.chat.completions.parse` does), and
    the schema's JSON text as vLLM takes it; anything else is named."""
    from canvaslm.generate import GenerationError

    assert SamplingParams(json_schema=Owner).json_schema == Owner.model_json_schema()
    assert SamplingParams(json_schema=json.dumps({"type": "integer"})).json_schema == {"type": "integer"}
    for bad, needle in (([1], "must be a JSON schema .* got list"), ("{nope", "json_schema is not valid JSON")):
        with pytest.raises(GenerationError, match=needle):
            SamplingParams(json_schema=bad)
    out = tiny_llm.generate("{", SamplingParams(seed=0, max_denoising_steps=2, max_new_tokens=400, json_schema=Owner))
    assert isinstance(Owner.model_validate_json(out[0].text).pet, (Cat, Dog))


def test_all_of_several_schemas_merges_them(tiny_llm):
    """allOf of several schemas (OpenAPI's way to extend a base object): properties and required joined, a property
    both give is the allOf of the two, bounds tightened; a closed member must list every property; members that
    disagree are refused naming the keyword."""
    schema = {"$defs": {"Base": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0}},
                                 "required": ["id"]}},
              "allOf": [{"$ref": "#/$defs/Base"},
                        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4},
                                                          "id": {"maximum": 50}}, "required": ["name"]},
                        {"properties": {"tag": {"enum": ["a", "b"]}}}]}
    for text in _outputs(tiny_llm, schema, seeds=range(3)):
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert set(value) == {"id", "name", "tag"} and 0 <= value["id"] <= 50
    tight = {"allOf": [{"type": "string", "maxLength": 6}, {"maxLength": 3, "minLength": 1}]}
    for text in _outputs(tiny_llm, tight, seeds=range(2)):
        assert 1 <= len(json.loads(text)) <= 3
    closed = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
                        {"properties": {"b": {"type": "integer"}}}]}
    with pytest.raises(ConstraintError, match=r"additionalProperties false does not list \['b'\]"):
        JsonSchemaConstraint(closed, tiny_llm.tokenizer)


def test_maps_validate(tiny_llm):
    """pydantic's dict[str, X] (an object whose additionalProperties is a schema): `array_items` entries of a key
    string and a value of that schema; a map that recurses stops at {}; an enum value is checked
    against the map's values."""
    schema = Inventory.model_json_schema()
    for text in _outputs(tiny_llm, schema, seeds=range(3)):
        inv = Inventory.model_validate_json(text)
        jsonschema.validate(json.loads(text), schema)
        assert 1 <= len(inv.counts) <= SMALL.array_items
    tree = {"type": "object", "additionalProperties": {"$ref": "#"}}  # the recursion stops at an empty map
    for text in _outputs(tiny_llm, tree, seeds=range(2)):
        value = json.loads(text)
        jsonschema.validate(value, tree)
        assert all(v == {} for v in value.values())
    pick = {"enum": [{"a": 1}, {"a": "x"}], "type": "object", "additionalProperties": {"type": "integer"}}
    for text in _outputs(tiny_llm, pick, seeds=range(2)):
        assert json.loads(text) == {"a": 1}


class Tuples(BaseModel):
    pair: tuple[int, str]
    triple: Optional[tuple[bool, float, Color]]
    many: tuple[int, ...]


def test_tuples_validate(tiny_llm):
    """prefixItems (pydantic's tuple[int, str]): each place its own schema, then `items` up to minItems (any value
    for none given); an older schema's `items` list reads the same; minItems past the prefix with items false
    is refused."""
    schema = Tuples.model_json_schema()
    for text in _outputs(tiny_llm, schema, seeds=range(3)):
        Tuples.model_validate_json(text)
        jsonschema.validate(json.loads(text), schema)
    for schema, validator, n in (({"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 3,
                                   "items": {"type": "boolean"}}, jsonschema.Draft202012Validator, 3),
                                 ({"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 2},
                                  jsonschema.Draft202012Validator, 2),
                                 ({"type": "array", "items": [{"type": "integer"}, {"const": "x"}]},
                                  jsonschema.Draft7Validator, 2)):
        for text in _outputs(tiny_llm, schema, seeds=range(2)):
            value = json.loads(text)
            validator(schema).validate(value)
            assert len(value) == n
    with pytest.raises(ConstraintError, match="minItems 2 is more than the 1 prefixItems"):
        JsonSchemaConstraint({"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 2, "items": False},
                             tiny_llm.tokenizer)


def test_recursive_alternative_stops_at_an_empty_array_and_a_loop_is_refused(tiny_llm):
    tree = {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"kids": {"type": "array",
                                                                                     "items": {"$ref": "#"}}}}]}
    for text in _outputs(tiny_llm, tree, seeds=range(3)):
        jsonschema.validate(json.loads(text), tree)
    loop = {"anyOf": [{"type": "object", "properties": {"x": {"$ref": "#"}}},
                      {"type": "array", "items": {"$ref": "#"}, "minItems": 1}]}
    with pytest.raises(ConstraintError, match="recursive \\$ref # -> #"):
        JsonSchemaConstraint(loop, tiny_llm.tokenizer)


def test_type_list_with_enum_keeps_the_values_of_any_type(tiny_llm):
    schema = {"type": ["string", "null"], "enum": ["ab", None, 3, "abcdef"], "maxLength": 3}
    c = JsonSchemaConstraint(schema, tiny_llm.tokenizer)
    [(_, dfa, _)] = c.pieces
    vocab = Vocab.of(tiny_llm.tokenizer)
    assert dfa_accepts(dfa, vocab.encode('"ab"')) and dfa_accepts(dfa, vocab.encode("null"))
    assert not dfa_accepts(dfa, vocab.encode("3")) and not dfa_accepts(dfa, vocab.encode('"abcdef"'))


def test_openai_client_parse_with_a_pydantic_model(client):
    """client.chat.completions.parse(response_format=Model): the schema openai derives (with $defs, anyOf
    null) is served, and the client parses every answer into the model."""

    class Pet(BaseModel):
        name: str = Field(max_length=6)
        age: Optional[int]
        owner: Optional[Address]
        tags: list[Color] = Field(max_length=2)

    c, model = client
    for seed in range(2):
        r = c.chat.completions.parse(model=model, messages=[{"role": "user", "content": "a pet"}],
                                     response_format=Pet, seed=seed, max_tokens=400)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed, Pet)
    for seed in range(2):  # a union of models, as openai's strict schema writes it
        r = c.chat.completions.parse(model=model, messages=[{"role": "user", "content": "a pet"}],
                                     response_format=Owner, seed=seed, max_tokens=400)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed.pet, (Cat, Dog))


class Owner(BaseModel):
    pet: Cat | Dog


def test_exclusive_bounds_hold_for_numbers_and_type_lists(tiny_llm):
    """exclusiveMinimum / exclusiveMaximum (pydantic's gt / lt, PositiveFloat) bind numbers as integers: a value at
    or past the bound is clamped to the nearest one past it that the slot writes (0 -> 0.000001), in a type list's
    number branch too (which once dropped the bound and wrote -4444465.144 for exclusiveMinimum 0)."""
    tok = tiny_llm.tokenizer
    vocab = Vocab.of(tok)
    [(width, _, finish)] = JsonSchemaConstraint({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                                tok).pieces
    for text, want in (("0", "0.000001"), ("-3", "0.000001"), ("1", "0.999999"), ("0.5", "0.5")):
        ids = vocab.encode(text)
        assert vocab.text(finish(ids + [vocab.pad_id] * (width - len(ids)))).strip() == want, text
    for schema in ({"type": ["integer", "number"], "exclusiveMinimum": 0},
                   {"type": ["number", "integer", "null"], "exclusiveMaximum": 5},
                   {"type": "object", "properties": {"x": {"type": "number", "exclusiveMinimum": -2.5, "maximum": 3}}},
                   {"type": ["integer", "number"], "exclusiveMinimum": 0, "enum": [-1, 1]}):  # through fits()
        for text in _outputs(tiny_llm, schema, seeds=range(3)):
            jsonschema.validate(json.loads(text), schema)
    with pytest.raises(ConstraintError, match="no number lies between"):
        JsonSchemaConstraint({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, tok)


def _chain(n, wrap):
    defs = {f"a{i}": wrap(f"#/$defs/a{i + 1}") for i in range(n)}
    defs[f"a{n}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


def test_unions_sharing_a_ref_are_not_walked_once_per_path(tiny_llm):
    """Chained unions whose two alternatives $ref the same next schema: 2**22 paths. The union's kind is
    kept per schema object and the compile keeps its deadline (121 s past a 1 s limit at n=23 before)."""
    schema = _chain(22, lambda r: {"anyOf": [{"$ref": r}, {"$ref": r}]})
    start = time.monotonic()
    try:
        JsonSchemaConstraint(schema, tiny_llm.tokenizer, JsonTemplateOptions(max_depth=1000), timeout=1.0)
    except ConstraintError:
        pass
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("wrap", [lambda r: {"$ref": r}, lambda r: {"allOf": [{"$ref": r}]},
                                  lambda r: {"anyOf": [{"$ref": r}, {"type": "null"}]}],
                         ids=["ref", "allOf", "optional"])
def test_long_ref_chains_end_at_max_depth(tiny_llm, wrap):
    """$ref, allOf and union hops count as levels: a chain of 400 is refused by name (a RecursionError before)."""
    with pytest.raises(ConstraintError, match="nesting deeper than 32 levels at"):
        JsonSchemaConstraint(_chain(400, wrap), tiny_llm.tokenizer)
    assert JsonSchemaConstraint(_chain(5, wrap), tiny_llm.tokenizer).pieces
    # a max_depth past Python's recursion limit: still a ConstraintError, not a RecursionError
    with pytest.raises(ConstraintError, match="nests too deeply to compile|nesting deeper than"):
        JsonSchemaConstraint(_chain(3000, wrap), tiny_llm.tokenizer, JsonTemplateOptions(max_depth=10 ** 6))
