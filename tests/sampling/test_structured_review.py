"""Structured output edge cases from review: number bounds too long for a canvas, regex anchors and \\u
escapes, a huge maxLength, non-finite enum / const values, exact integer clamps, and error messages."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from canvaslm.llm import SamplingParams
from canvaslm.sampling.constraints import ConstraintError
from canvaslm.sampling.json_schema import JsonSchemaConstraint, JsonTemplateOptions, constraint_from_response_format
from canvaslm.sampling import regex_fsm
from canvaslm.sampling.regex_fsm import RegexCompileError, char_fsm
from canvaslm.sampling.token_dfa import Vocab, number_dfa
from canvaslm.sampling.tool_call import call_constraint

C = 16  # the tiny checkpoint's canvas length

FAR = [  # bounds whose text is wider than a canvas of 16
    {"type": "integer", "minimum": 0, "maximum": 10**20},
    {"type": "integer", "maximum": 1e300},
    {"type": "integer", "minimum": -10**30, "maximum": 10**25},
    {"type": "number", "minimum": 0, "maximum": 1000000000000000.5},
    {"type": "number", "minimum": -123456789012345678.25},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 10**40}}},
]


@pytest.fixture(scope="module")
def server(tiny_llm):
    from fastapi.testclient import TestClient

    from canvaslm.server.app import build_app
    from canvaslm.server.launch import build_state

    state = build_state(tiny_llm.model_dir, device="cpu", served_model_name="tiny")
    try:
        yield TestClient(build_app(state), raise_server_exceptions=False)
    finally:
        state.shutdown()


def _accepts(dfa, ids) -> bool:
    s = dfa.start
    for t in ids:
        g = int(dfa.sym_of_token[t])
        s = -1 if g < 0 else int(dfa.trans[s, g])
        if s < 0:
            return False
    return bool(dfa.accept[s])


def _rf(schema):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("schema", FAR)
def test_far_bounds_lay_out_on_one_canvas_and_validate(tiny_llm, schema):
    c = JsonSchemaConstraint(schema, tiny_llm.tokenizer)
    assert c.min_new_tokens(C) <= C  # no slot wider than a canvas (it used to need 19..301 tokens)
    for seed in range(3):
        text = tiny_llm.generate("x", SamplingParams(seed=seed, constraint=c, temperature=1.5))[0].text
        jsonschema.validate(json.loads(text), schema)


def test_digit_cap_keeps_values_under_the_bound(tiny_llm):
    v = Vocab.of(tiny_llm.tokenizer)
    dfa = number_dfa(v, integer=False, allow_minus=True, max_digits=3)
    for ok in ("999", "-999.5", "0.25", "100 "):
        assert _accepts(dfa, v.encode(ok) + ([v.pad_id] if ok.endswith(" ") else [])), ok
    for bad in ("1000", "-1000.5"):
        assert not _accepts(dfa, v.encode(bad)), bad


def test_far_bounds_over_http_are_answered(server):
    for schema in FAR[:4]:
        r = server.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "seed": 1,
                                                 "response_format": _rf(schema)})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)
    tools = [{"type": "function", "function": {"name": "f", "parameters": FAR[5]}}]
    r = server.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                  "tools": tools, "tool_choice": "required", "max_tokens": 64})
    assert r.status_code == 200, r.text
    args = json.loads(r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    jsonschema.validate(args, FAR[5])


def test_canvas_length_is_checked_when_the_constraint_is_built(tiny_llm):
    tok, schema = tiny_llm.tokenizer, {"type": "integer", "minimum": 10**20}  # the slot must write 21 digits
    constraint_from_response_format(_rf(schema), tok, None)  # no canvas length: laid out later
    with pytest.raises(ConstraintError, match="canvas_length=16"):
        constraint_from_response_format(_rf(schema), tok, None, canvas_length=C)
    assert constraint_from_response_format(_rf(schema), tok, None, canvas_length=32) is not None
    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"x": schema}}}} for n in ("f", "g")]
    with pytest.raises(ConstraintError, match=r"tools\[0\].function.parameters: .*canvas_length=16"):
        call_constraint(tools[:1], "required", tok, canvas_length=C)
    with pytest.raises(ConstraintError, match=r"tools\[1\].function.parameters: .*canvas_length=16"):
        call_constraint([tools[0] | {"function": {"name": "f"}}, tools[1]], "required", tok, canvas_length=C)


def test_integer_clamp_is_exact(tiny_llm):
    v = Vocab.of(tiny_llm.tokenizer)
    for typ in ("integer", "number"):
        schema = {"type": typ, "minimum": 0, "maximum": 2**60}
        c = JsonSchemaConstraint(schema, tiny_llm.tokenizer, JsonTemplateOptions(integer_tokens=24, number_tokens=24))
        width, _, finish = c.pieces[0]
        ids = v.encode(str(2**60 + 1))
        out = v.text(finish(ids + [v.pad_id] * (width - len(ids)))).strip()
        assert out == str(2**60)
        jsonschema.validate(json.loads(out), schema)


def test_large_max_length_saturates(tiny_llm):
    for ml in (20000, 65535, 10**9):
        schema = {"type": "object", "properties": {"bio": {"type": "string", "maxLength": ml}}}
        c = JsonSchemaConstraint(schema, tiny_llm.tokenizer)
        text = tiny_llm.generate("x", SamplingParams(seed=0, constraint=c))[0].text
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("schema,key", [
    ({"enum": [float("nan"), 1]}, "enum"), ({"const": float("nan")}, "const"),
    ({"type": "number", "enum": [float("inf")]}, "enum"),
    ({"type": "object", "properties": {"x": {"const": -float("inf")}}}, "const"),
    ({"const": {"a": [1, float("inf")]}}, "const"),
])
def test_non_finite_enum_and_const_are_refused(tiny_llm, schema, key):
    with pytest.raises(ConstraintError, match=f"'{key}' holds a non-finite number"):
        JsonSchemaConstraint(schema, tiny_llm.tokenizer)


@pytest.mark.parametrize("pattern,text", [
    (r"^\d{3}$", r"\d{3}"), (r"^[A-Z]{2}", "[A-Z]{2}"), (r"\A\d+\Z", r"\d+"), (r"\u0041\d", r"A\d"),
    (r"[\u0061-\u0063]{2}", "[a-c]{2}"), (r"\U00000041", "A"), (r"^a|^b$", "a|b"), (r"(a|b)$", "(a|b)"),
    (r"\u002e", r"\."), (r"[\u005d\u005e]", r"[\]\^]"), (r"[^$]", "[^$]"), (r"a\$", r"a\$"), (r"[]a]", r"[\]a]"),
])
def test_regex_anchors_and_unicode_escapes(pattern, text):
    assert regex_fsm.normalized(pattern) == text
    char_fsm(pattern)  # compiles


@pytest.mark.parametrize("pattern,match", [
    ("(^a)", r"anchor \^ is only supported"), ("a$b", r"anchor \$ is only supported"),
    (r"a\Ab", r"anchor \\A"), (r"(a\Z)", r"anchor \\Z"), (r"\u12", "needs 4 hex digits"),
    ("a{3,1}", "minimum repeat greater than its maximum"),
])
def test_regex_refusals_name_the_problem(pattern, match):
    with pytest.raises(RegexCompileError, match=match):
        char_fsm(pattern)


def test_regex_anchors_over_http(server):
    for pattern in (r"^\d{3}$", r"\A[a-c]{2}\Z", r"\u0041\d"):
        r = server.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "seed": 0, "guided_regex": pattern})
        assert r.status_code == 200, r.text
        assert re.fullmatch(pattern.replace(r"\Z", "$"), r.json()["choices"][0]["text"])


def test_messages(server):
    def err(path, body):
        r = server.post(path, json=body)
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    base = {"model": "tiny", "prompt": "hi"}
    assert "matches only the empty string" in err("/v1/completions", base | {"guided_grammar": 'root ::= ""'})
    assert "matches only the empty string" in err("/v1/completions", base | {"guided_grammar": 'root ::= "" | ""'})
    assert "unexpected '*'" in err("/v1/completions", base | {"guided_grammar": "root ::= *"})
    assert "unexpected '{2}'" in err("/v1/completions", base | {"guided_grammar": "root ::= {2}"})
    assert "minimum repeat greater than" in err("/v1/completions", base | {"guided_regex": "a{3,1}"})
    msg = err("/completion", {"prompt": "hi", "json_schema": {"type": "string", "format": "color"}})
    assert msg.startswith("json_schema: format 'color'") and "json_schema: json_schema" not in msg
    body = '{"model": "tiny", "prompt": "hi", "guided_json": {"const": NaN}}'
    r = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "'const' holds a non-finite number" in r.json()["error"]["message"]


def test_a_bound_written_in_full_too_wide_for_a_canvas_is_a_400(server):
    """A lower bound far from zero must be written in full: wider than a canvas it is a 400 naming the field (it was
    a 500 from the engine's mask step)."""
    wide = {"type": "integer", "minimum": 10**20}
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "response_format": _rf(wide)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": wide}}}}]
    r = server.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                  "tools": tools, "tool_choice": "required", "max_tokens": 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
