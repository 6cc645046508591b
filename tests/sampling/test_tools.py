"""Tool calls over the official openai client: a forced call's arguments always parse and fit the function's
parameter schema, streamed calls equal non-streamed ones, declarations and earlier calls reach the prompt,
and what the server cannot do ('auto', a choice among several tools) is refused by name."""

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


def test_streamed_call_equals_the_whole_call(client):
    c, model = client
    kwargs = dict(model=model, messages=USER, tools=[WEATHER], tool_choice=NAMED, seed=9, max_tokens=64)
    whole = c.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(c.chat.completions.create(stream=True, **kwargs))
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.id.startswith("call_") and first.function.name == "get_weather" and first.type == "function"
    args = "".join(tc.function.arguments or "" for ch in chunks for d in [ch.choices[0].delta]
                   for tc in (d.tool_calls or []))
    assert args == whole.function.arguments
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
    ({"tools": [WEATHER]}, "tool_choice", "'auto' is not supported"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "'auto' is not supported"),
    ({"tools": [WEATHER, PING], "tool_choice": "required"}, "tool_choice", "among 2 tools"),
    ({"tools": [PING], "tool_choice": NAMED}, "tool_choice", "not in tools"),
    ({"tool_choice": NAMED}, "tool_choice", "needs tools"),
    ({"tools": [PING, PING], "tool_choice": "required"}, "tools", "name twice"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "stop": ["}"]}, "stop", "cut a tool call"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "extra_body": {"guided_choice": ["a"]}}, "tool_choice", "send one"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice",
     "send one"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}], "tool_choice": "required"},
     "tools", r"tools\[0\].function.parameters: .*pattern"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "max_tokens": 5}, "tools", "over max_tokens=5"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"}, "tools",
     "should match pattern"),
])
def test_what_cannot_be_done_is_refused_by_name(client, extra, param, needle):
    c, model = client
    with pytest.raises(openai.BadRequestError, match=needle) as e:
        c.chat.completions.create(model=model, messages=USER, **extra)
    assert e.value.body["param"] == param, e.value.body
