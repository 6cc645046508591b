"""Tool calls over the official openai client: a call's arguments always parse and fit the function's
parameter schema, whether the function is named or picked by the model among several; streamed calls
equal non-streamed ones; declarations and earlier calls reach the prompt; and what the server cannot do
('auto' without the native call tokens) is refused by name."""

from __future__ import annotations

import json

import jsonschema
import pytest

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters: the arguments are {}
USER = [{"role": "user", "content": "weather?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_forced_call_arguments_fit_the_schema(client):
    c, model = client
    r = c.chat.completions.create(model=model, messages=USER, tools=[WEATHER, PING], tool_choice=NAMED, n=3,
                                  seed=4)
    ids = set()
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        ids.add(call.id)
    assert len(ids) == 3
    r = c.chat.completions.create(model=model, messages=USER, tools=[PING], tool_choice="required", seed=1)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}


def test_the_model_picks_among_several_functions(client):
    c, model = client
    schemas = {"get_weather": WEATHER["function"]["parameters"], "ping": {"type": "object", "maxProperties": 0}}
    picked = set()
    for seed in range(6):
        r = c.chat.completions.create(model=model, messages=USER, tools=[WEATHER, PING], tool_choice="required",
                                      seed=seed, n=2)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls" and ch.message.content is None
            (call,) = ch.message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            picked.add(call.function.name)
    assert picked == set(schemas), picked  # the random model's pick varies with the seed


@pytest.mark.parametrize("tools,choice", [([WEATHER], NAMED), ([WEATHER, PING], "required")])
def test_streamed_call_equals_the_whole_call(client, tools, choice):
    c, model = client
    for seed in (9, 2):
        kwargs = dict(model=model, messages=USER, tools=tools, tool_choice=choice, seed=seed)
        whole = c.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
        chunks = list(c.chat.completions.create(stream=True, **kwargs))
        calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        named = [tc for tc in calls if tc.id is not None]
        assert len(named) == 1 and named[0].id.startswith("call_") and named[0].type == "function"
        assert named[0].function.name == whole.function.name and calls[0] is named[0]  # the name comes first
        assert "".join(tc.function.arguments or "" for tc in calls) == whole.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert all(ch.choices[0].delta.content is None for ch in chunks)


def test_declarations_and_earlier_calls_reach_the_prompt(client, tiny_llm):
    c, model = client
    tok = tiny_llm.tokenizer
    plain = c.chat.completions.create(model=model, messages=USER, max_tokens=4, seed=0).usage.prompt_tokens
    with_tools = c.chat.completions.create(model=model, messages=USER, tools=[WEATHER], tool_choice=NAMED,
                                           seed=0).usage.prompt_tokens
    assert with_tools == len(tok.encode_chat(USER, tools=[WEATHER])) > plain
    none = c.chat.completions.create(model=model, messages=USER, tools=[WEATHER], tool_choice="none",
                                     max_tokens=4, seed=0)
    assert none.usage.prompt_tokens == plain and none.choices[0].message.tool_calls is None  # plain text turn
    args = '{"city": "Oslo", "unit": "c"}'
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"}]
    r = c.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice=NAMED, seed=0)
    expected = [USER[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.loads(args)}}]},
        {"role": "tool", "content": "sunny, 21", "tool_call_id": "call_1"}]
    assert 'call:get_weather{"city": "Oslo"' in tok.apply_chat_template(expected, tools=[WEATHER])
    assert r.usage.prompt_tokens == len(tok.encode_chat(expected, tools=[WEATHER]))


@pytest.mark.parametrize("extra,param,needle", [
    ({"tools": [WEATHER]}, "tool_choice", "has no such tokens"),  # 'auto' needs the native call tokens
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "has no such tokens"),
    ({"tools": [WEATHER, PING], "tool_choice": "required", "max_tokens": 40}, "tools", "over max_tokens=40"),
    ({"tools": [PING, {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "format": "x"}}}],
      "tool_choice": "required"}, "tools", r"tools\[1\].function.parameters: .*format"),
    ({"tools": [PING], "tool_choice": NAMED}, "tool_choice", "not in tools"),
    ({"tool_choice": NAMED}, "tool_choice", "needs tools"),
    ({"tools": [PING, PING], "tool_choice": "required"}, "tools", "name twice"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "stop": ["}"]}, "stop", "cut a tool call"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "extra_body": {"guided_choice": ["a"]}}, "tool_choice", "send one"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice",
     "send one"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "color"}}}}}], "tool_choice": "required"},
     "tools", r"tools\[0\].function.parameters: .*format"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "max_tokens": 5}, "tools", "over max_tokens=5"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "tools", r"tools\[0\].function.parameters of 'f' must be an object schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"}, "tools",
     "should match pattern"),
])
def test_what_cannot_be_done_is_refused_by_name(client, extra, param, needle):
    c, model = client
    with pytest.raises(openai.BadRequestError, match=needle) as e:
        c.chat.completions.create(model=model, messages=USER, **extra)
    assert e.value.body["param"] == param, e.value.body


def test_parameters_must_be_an_object_schema(tiny_llm):
    from canvaslm.sampling.constraints import ConstraintError
    from canvaslm.sampling.json_schema import JsonSchemaConstraint
    from canvaslm.sampling.tool_call import EMPTY_PARAMETERS, declared_functions

    def fn(**kw):
        return {"type": "function", "function": {"name": "f", **kw}}

    assert declared_functions([fn()]) == [("f", EMPTY_PARAMETERS)]
    assert declared_functions([fn(parameters={})]) == [("f", EMPTY_PARAMETERS)]
    assert declared_functions([fn(parameters={"type": "object"})]) == [("f", {"type": "object"})]
    assert declared_functions([fn(parameters={"properties": {}})]) == [("f", {"type": "object", "properties": {}})]
    for params in ({"type": "string"}, {"type": "array", "items": {}}, {"type": ["integer"]}, {"type": "null"}):
        with pytest.raises(ConstraintError, match=r"tools\[0\].function.parameters of 'f' must be an object schema"):
            declared_functions([fn(parameters=params)])
    with pytest.raises(ConstraintError, match="const"):  # untyped: an object schema, which 5 does not fit
        JsonSchemaConstraint(declared_functions([fn(parameters={"const": 5})])[0][1], tiny_llm.tokenizer)


def test_tool_choice_constraint_in_the_python_api(tiny_llm):
    """Through LLM.generate (the generate.py runner), over seeds, prompts and a batch: the output is always a
    whole call to one of the functions, with arguments that fit that function's schema."""
    from canvaslm import SamplingParams
    from canvaslm.sampling.constraints import ConstraintError
    from canvaslm.sampling.tool_call import ToolChoiceConstraint, call_arguments

    tools = [("get_weather", WEATHER["function"]["parameters"]),
             ("ping", {"type": "object", "properties": {}, "additionalProperties": False})]
    c = ToolChoiceConstraint(tools, tiny_llm.tokenizer)
    C = tiny_llm.model.cfg.canvas_length
    assert c.name_canvases(C) * C >= len(c.prefix) + max(len(a) for a in c.alternatives)
    params = [SamplingParams(constraint=c, seed=s, max_denoising_steps=2 + s) for s in range(4)]
    names = set()
    for out in tiny_llm.generate(["call a tool", "x", "weather in Oslo?", "ping"], params):
        name, args = call_arguments(out.text, [n for n, _ in tools])
        jsonschema.validate(json.loads(args), {**dict(tools)[name], "maxProperties": 3 if name != "ping" else 0})
        assert out.finish_reason == "stop"
        names.add(name)
    assert names == {"get_weather", "ping"}, names
    for bad, needle in (([tools[0]], "at least two"), ([tools[0], tools[0]], "declared twice"),
                        ([tools[1], ("f", {"type": "string", "format": "color"})], r"tools\[1\].function.parameters")):
        with pytest.raises(ConstraintError, match=needle):
            ToolChoiceConstraint(bad, tiny_llm.tokenizer)


def test_llm_chat_tool_calls(tiny_llm):
    """The Python API takes the same tools and tool_choice as the server, with the same guarantee."""
    from canvaslm import SamplingParams
    from canvaslm.generate import GenerationError
    from canvaslm.sampling.constraints import ConstraintError

    schemas = {"get_weather": WEATHER["function"]["parameters"], "ping": {"type": "object", "maxProperties": 0}}
    picked = set()
    for seed in range(6):
        r = tiny_llm.chat(USER, SamplingParams(seed=seed), tools=[WEATHER, PING], tool_choice="required")
        (call,) = r.tool_calls
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        picked.add(call["function"]["name"])
    assert picked == set(schemas)
    r = tiny_llm.chat(USER, SamplingParams(seed=1), tools=[WEATHER, PING], tool_choice=NAMED)
    assert r.tool_calls[0]["function"]["name"] == "get_weather" and r.tool_calls[0]["function"]["arguments"] == r.text
    text = tiny_llm.chat(USER, SamplingParams(seed=1, max_new_tokens=8), tools=[WEATHER])
    assert text.tool_calls is None and text.prompt_ids == tiny_llm.tokenizer.encode_chat(USER, tools=[WEATHER])
    assert tiny_llm.chat(USER, SamplingParams(max_new_tokens=8), tools=[WEATHER], tool_choice="none").prompt_ids \
        == tiny_llm.tokenizer.encode_chat(USER)
    with pytest.raises(GenerationError, match="has no such tokens"):
        tiny_llm.chat(USER, tools=[WEATHER], tool_choice="auto")
    for tools, choice, needle in (([WEATHER], {"type": "function", "function": {"name": "nope"}}, "name one of"),
                                  ([{"type": "function"}], "required", r"tools\[0\] must be"),
                                  ([PING, PING], "required", "declares a function name twice")):
        with pytest.raises(ConstraintError, match=needle):
            tiny_llm.chat(USER, tools=tools, tool_choice=choice)
