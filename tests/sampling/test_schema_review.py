"""JSON-schema compiles that scale: a large enum compiles in time linear in its size (its keywords checked
once, membership by key), keeps JSON equality (1 == 1.0, true != 1) exactly, and a deadline stops a compile."""

from __future__ import annotations

import itertools
import time

import pytest

from canvaslm.sampling.constraints import ConstraintError
from canvaslm.sampling.json_schema import (JsonSchemaConstraint, JsonTemplateOptions, _Compiler, _Members, _same,
                                           constraint_from_response_format)
from canvaslm.sampling.token_dfa import Vocab

TRICKY = [1, 1.0, True, False, 0, 0.0, -0.0, None, "1", "", "true", [], {}, [1], [1.0], [True], [[1, "x"]],
          {"a": 1}, {"a": 1.0}, {"a": True}, {"a": [1], "b": None}, {"b": None, "a": [1.0]}, 2**53, 2**53 + 1,
          float(2**53), 1e16, 10**16, 0.5, -3, -3.0]


def _enum(n: int) -> dict:
    return {"type": "string", "enum": [f"v{i:05d}" for i in range(n)]}


def test_enum_membership_is_json_equality():
    """The keyed membership answers exactly as a scan with _same, on values that Python's == mixes up."""
    for k in range(1, 4):
        for enum in itertools.combinations(TRICKY, k):
            members = _Members(list(enum))
            for v in TRICKY:
                assert (v in members) == any(_same(v, e) for e in enum), (v, enum)


def _kept(schema: dict, tokenizer) -> list:
    return _Compiler(Vocab.of(tokenizer), JsonTemplateOptions()).choices(schema, "$", 0)


def test_enum_values_kept_by_type_and_equality(tiny_llm):
    tok = tiny_llm.tokenizer
    assert _kept({"type": "integer", "enum": [1.0, True, "1", 2, 2.5]}, tok) == [1.0, 2]
    nested = {"type": "array", "items": {"enum": [1, [2]]}, "enum": [[1.0], [True], [[2.0]], [3]]}
    assert _kept(nested, tok) == [[1.0], [[2.0]]]
    assert _kept({"enum": [{"a": 1.0}, {"a": True}], "const": {"a": 1}}, tok) == [{"a": 1.0}]
    with pytest.raises(ConstraintError, match="no 'enum' value fits"):
        JsonSchemaConstraint({"type": "array", "items": {"enum": [1]}, "enum": [[True], ["1"]]}, tok)


def test_a_large_enum_compiles_in_linear_time(tiny_llm):
    """5000 values: each was checked against the whole enum (its keywords walked and scanned again per value),
    ~30 s here; now well under a second."""
    rf = {"type": "json_schema", "json_schema": {"schema": _enum(5000)}}
    start = time.monotonic()
    constraint_from_response_format(rf, tiny_llm.tokenizer, 64)
    assert time.monotonic() - start < 4.0


def test_a_shared_schema_object_still_counts_its_depth(tiny_llm):
    """Keywords are checked once per schema object, but the depth limit holds wherever it is met again."""
    loop = {"type": "array", "minItems": 1, "maxItems": 1}
    loop["items"] = loop  # a cycle (a Python caller can build one)
    with pytest.raises(ConstraintError, match="nesting deeper than"):
        JsonSchemaConstraint(loop, tiny_llm.tokenizer)


def test_a_deadline_stops_the_compile(tiny_llm):
    rf = {"type": "json_schema", "json_schema": {"schema": _enum(3000)}}
    with pytest.raises(ConstraintError, match=r"took longer than the limit of 0\.001 s"):
        constraint_from_response_format(rf, tiny_llm.tokenizer, 64, timeout=0.001)
    assert constraint_from_response_format(rf, tiny_llm.tokenizer, 64, timeout=60) is not None
