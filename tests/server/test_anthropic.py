"""Anthropic's Messages API (server/anthropic.py), driven by the official `anthropic` client: each request
must mean exactly what its /v1/chat/completions translation means."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

anthropic = pytest.importorskip("anthropic")

from canvaslm.engine.engine import EngineConfig  # noqa: E402
from canvaslm.server.launch import BackgroundServer, build_state  # noqa: E402

MODEL = "tiny"
WEATHER = {"name": "get_weather", "description": "weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, one_thread):
    state = build_state(tiny_checkpoint, "cpu", "float32", EngineConfig(max_batch=4, max_model_len=1024),
                        served_model_name=MODEL)
    with BackgroundServer(state) as srv:
        yield srv


@pytest.fixture(scope="module")
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clients(server):
    return (anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0),
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0))


def test_a_message_equals_its_chat_completion(server):
    a, o = clients(server)
    for seed in (0, 4):
        msg = a.messages.create(model=MODEL, max_tokens=40, system="be brief",  # temperature: older clients' field
                                messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                                extra_body={"seed": seed, "temperature": 0.5})
        ref = o.chat.completions.create(model=MODEL, max_tokens=40, temperature=0.5, seed=seed,
                                        messages=[{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "hello"}])
        assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
        assert [b.type for b in msg.content] == (["text"] if ref.choices[0].message.content else [])
        assert "".join(b.text for b in msg.content) == ref.choices[0].message.content
        assert msg.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[ref.choices[0].finish_reason]
        assert msg.usage.output_tokens == ref.usage.completion_tokens
        assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == ref.usage.prompt_tokens


def test_a_stream_equals_the_whole_message(server):
    a, _ = clients(server)
    kwargs = dict(model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "stream me"}],
                  extra_body={"seed": 3})
    whole = a.messages.create(**kwargs)
    with a.messages.stream(**kwargs) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "".join(b.text for b in whole.content)
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequences_cut_the_text_and_are_named(server):
    a, _ = clients(server)
    kwargs = dict(model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "stop me"}],
                  extra_body={"seed": 5})
    free = a.messages.create(**kwargs).content[0].text
    word = free[8:10]
    cut = a.messages.create(stop_sequences=["@@x"] * 5 + [word], **kwargs)  # more than OpenAI's 4
    assert cut.content[0].text == free[:free.find(word)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word


def test_a_forced_tool_call_and_its_result(server):
    a, o = clients(server)
    msg = a.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
                            messages=[{"role": "user", "content": "weather in Oslo?"}], extra_body={"seed": 1})
    (use,) = msg.content
    assert use.type == "tool_use" and use.name == "get_weather" and msg.stop_reason == "tool_use"
    assert set(use.input) == {"city"} and isinstance(use.input["city"], str) and len(use.input["city"]) <= 8
    ref = o.chat.completions.create(model=MODEL, max_tokens=60, seed=1,
                                    tools=[{"type": "function", "function": {
                                        "name": "get_weather", "description": "weather in a city",
                                        "parameters": WEATHER["input_schema"]}}],
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                    messages=[{"role": "user", "content": "weather in Oslo?"}])
    assert json.loads(ref.choices[0].message.tool_calls[0].function.arguments) == use.input
    # the result goes back as a tool message: the prompt is the chat route's, token for token
    history = [{"role": "user", "content": "weather in Oslo?"},
               {"role": "assistant", "content": [{"type": "text", "text": "let me see"},
                                                 {"type": "tool_use", "id": use.id, "name": use.name,
                                                  "input": use.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"},
                                            {"type": "text", "text": "and tomorrow?"}]}]
    counted = a.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=history).input_tokens
    chat = [{"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": "let me see", "tool_calls": [
                {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
            {"role": "tool", "tool_call_id": use.id, "content": "sunny"},
            {"role": "user", "content": "and tomorrow?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                               "parameters": WEATHER["input_schema"]}}]
    tokens = httpx.post(server.base_url + "/tokenize", json={"messages": chat, "tools": tools}).json()["count"]
    assert counted == tokens
    reply = a.messages.create(model=MODEL, max_tokens=20, tools=[WEATHER], tool_choice={"type": "none"},
                              messages=history, extra_body={"seed": 2})
    assert reply.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in reply.content)
    with a.messages.stream(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice={"type": "any"},
                           messages=[{"role": "user", "content": "weather in Oslo?"}], extra_body={"seed": 1}) as s:
        streamed = s.get_final_message()
    assert streamed.content[0].type == "tool_use" and streamed.content[0].input == use.input


@pytest.mark.parametrize("kwargs,needle", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type":
                                                                            "image/png", "data": "AA=="}}]}]},
     "cannot read images"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type":
                                                                            "application/pdf", "data": "AA=="}}]}]},
     "messages[0].content[0].source.media_type: 'application/pdf' is not one of image/jpeg"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "sometimes"}},
     "thinking.type 'sometimes': expected enabled, adaptive or disabled"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "server tool"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "tool_choice": {"type": "any"},
      "stop_sequences": ["a"]}, "stop_sequences would cut"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, "maximum context length"),
    # errors about the translated chat body name the Messages fields, without pydantic's dump
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 2**63}},
     "thinking.budget_tokens must be an integer in [0, 9223372036854775807]"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}}, "tool_choice 'any' needs tools"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "", "input": {}}]}, {"role": "user", "content": "y"}]},
     "messages: as a ChatCompletionRequest, messages[1].tool_calls[0].function.name: String should have at least"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": 5}]}]},
     "messages[0].content[0].content: content must be a string or a list of blocks, got int"),
])
def test_refusals_use_anthropics_error_body(server, kwargs, needle):
    a, _ = clients(server)
    kwargs = {"model": MODEL, "max_tokens": 10, **kwargs}
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(**kwargs)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert needle in e.value.body["error"]["message"], e.value.body
    with pytest.raises(anthropic.NotFoundError):
        a.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_the_api_key_may_come_as_x_api_key(server, monkeypatch):
    monkeypatch.setattr(server.state, "api_key", "sekret")
    good = anthropic.Anthropic(base_url=server.base_url, api_key="sekret", max_retries=0)
    assert good.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x"}]).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    assert httpx.get(server.base_url + "/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
    assert httpx.get(server.base_url + "/v1/models", headers={"x-api-key": "wrong"}).status_code == 401


def test_structured_output_always_parses(server):
    import jsonschema

    a, _ = clients(server)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    for seed in (0, 1):
        msg = a.messages.create(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "json please"}],
                                output_config={"format": {"type": "json_schema", "schema": schema}},
                                extra_body={"seed": seed})
        jsonschema.validate(json.loads(msg.content[0].text), schema)
    with pytest.raises(anthropic.BadRequestError, match="output_config.format"):
        a.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "x"}],
                          output_config={"format": {"type": "xml"}})


def test_a_final_assistant_message_is_a_prefill_the_reply_continues(server):
    """Anthropic's prefill: the reply goes on from a final assistant message (the chat route's
    continue_final_message), in the reply and in count_tokens; it does not open a new assistant turn."""
    a, o = clients(server)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Sure: "}]}]
    msg = a.messages.create(model=MODEL, max_tokens=8, messages=msgs, extra_body={"seed": 1})
    ref = o.chat.completions.create(model=MODEL, max_tokens=8, seed=1, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert msg.content[0].text == ref.choices[0].message.content
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == ref.usage.prompt_tokens
    assert a.messages.count_tokens(model=MODEL, messages=msgs).input_tokens == ref.usage.prompt_tokens


def test_streamed_usage_equals_the_whole_reply_usage(server):
    """A stream's final message has the same usage as the reply sent whole, prefix-cache reads included (they are
    known only at the end, so message_delta carries the whole usage, as Anthropic's does)."""
    a, _ = clients(server)
    kw = dict(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "usage, please"}], extra_body={"seed": 3})
    a.messages.create(**kw)  # the prompt is now in the prefix cache
    whole = a.messages.create(**kw)
    with a.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    assert whole.usage.cache_read_input_tokens > 0
    assert streamed.usage.model_dump() == whole.usage.model_dump()


def test_disable_parallel_tool_use_reaches_the_chat_request():
    """tool_choice.disable_parallel_tool_use: at most one tool_use block, as the chat route's
    parallel_tool_calls=false gives (it was dropped in translation)."""
    from canvaslm.server.anthropic import MessagesRequest, to_chat

    def chat(choice):
        return to_chat(MessagesRequest(model=MODEL, max_tokens=8, tools=[WEATHER], tool_choice=choice,
                                       messages=[{"role": "user", "content": "x"}]))

    assert chat({"type": "any", "disable_parallel_tool_use": True}).parallel_tool_calls is False
    assert chat({"type": "auto", "disable_parallel_tool_use": True}).parallel_tool_calls is False
    assert chat({"type": "auto"}).parallel_tool_calls is not False
