"""/v1/responses through the official openai client: the same reply as /v1/chat/completions for the same
conversation and seed, the Responses layout (output items, status, usage), the event stream, structured
output, function calls both ways, and refusals that name the Responses field."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from canvaslm.server.launch import BackgroundServer, build_state

from .conftest import CANVAS, seed_with

MODEL = "tiny"
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "unit": {"enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "current weather in a city",
           "parameters": WEATHER_PARAMS}


@pytest.fixture(scope="module")
def client(tiny_checkpoint, one_thread):
    with BackgroundServer(build_state(tiny_checkpoint, "cpu", "float32", served_model_name=MODEL)) as srv:
        yield OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def test_text_input_is_one_user_message(client):
    r = client.responses.create(model=MODEL, input="What is up?", max_output_tokens=20, extra_body={"seed": 3})
    want = chat(client, [{"role": "user", "content": "What is up?"}], max_tokens=20, seed=3)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == want.choices[0].message.content
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.input_tokens == want.usage.prompt_tokens
    assert r.usage.output_tokens == want.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if want.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None


def test_top_p_and_top_k_reach_the_chat_sampler(client):
    r = client.responses.create(model=MODEL, input="What is up?", max_output_tokens=20, top_p=0.6,
                                extra_body={"seed": 3, "top_k": 4})
    want = chat(client, [{"role": "user", "content": "What is up?"}], max_tokens=20, seed=3, top_p=0.6,
                extra_body={"top_k": 4})
    assert r.output_text == want.choices[0].message.content
    assert r.top_p == 0.6


def test_instructions_and_items_become_the_chat_conversation(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
             {"type": "message", "role": "user", "content": "how are you?"}]
    r = client.responses.create(model=MODEL, instructions="Be brief.", input=items, max_output_tokens=12,
                                temperature=0.5, extra_body={"seed": 8, "max_denoising_steps": 4})
    want = chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"}],
                max_tokens=12, temperature=0.5, seed=8, extra_body={"max_denoising_steps": 4})
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens
    assert r.instructions == "Be brief." and r.temperature == 0.5


def test_stream_sends_the_event_sequence_and_the_same_text(client):
    seed, whole = seed_with(lambda s: client.responses.create(model=MODEL, input="Tell me a story",
                                                             max_output_tokens=40, extra_body={"seed": s}),
                            lambda r: len(r.output_text) > CANVAS, range(5, 100))  # text in more than one commit
    kw = dict(model=MODEL, input="Tell me a story", max_output_tokens=40, extra_body={"seed": seed})
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if whole.status == "incomplete" else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2 and "".join(deltas) == whole.output_text  # one delta per committed canvas
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens


def test_output_text_logprobs_equal_chat_logprobs(client):
    """include message.output_text.logprobs (and top_logprobs): the text part carries chat's entries for the
    same conversation and seed, streamed on the done events too; without it there are none."""
    kw = dict(model=MODEL, input="What is up?", max_output_tokens=30, extra_body={"seed": 6})
    want = chat(client, [{"role": "user", "content": "What is up?"}], max_tokens=30, seed=6, logprobs=True,
                top_logprobs=2).choices[0].logprobs.content
    r = client.responses.create(**kw, include=["message.output_text.logprobs"], top_logprobs=2)
    got = r.output[0].content[0].logprobs
    assert [(e.token, round(e.logprob, 4)) for e in got] == [(e.token, round(e.logprob, 4)) for e in want]
    assert [[t.token for t in e.top_logprobs] for e in got] == [[t.token for t in e.top_logprobs] for e in want]
    assert len(want) > 5
    events = list(client.responses.create(**kw, include=["message.output_text.logprobs"], top_logprobs=2,
                                          stream=True))
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [(e.token, round(e.logprob, 4)) for e in done.logprobs] == [(e.token, round(e.logprob, 4)) for e in want]
    deltas = [e for e in events if e.type == "response.output_text.delta"]  # each carries its own tokens' entries
    assert [(x.token, round(x.logprob, 4)) for e in deltas for x in e.logprobs] == \
        [(e.token, round(e.logprob, 4)) for e in want]
    assert not getattr(client.responses.create(**kw).output[0].content[0], "logprobs", None)
    with pytest.raises(BadRequestError) as e:
        client.responses.create(**kw, include=["file_search_call.results"])
    assert e.value.body["param"] == "include" and "file_search_call.results" in e.value.body["message"]


def test_json_schema_format(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="a number", extra_body={"seed": 1},
                                text={"format": {"type": "json_schema", "name": "num", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_named_function_call_and_its_result_in_the_next_turn(client):
    r = client.responses.create(model=MODEL, input="weather?", tools=[WEATHER], extra_body={"seed": 2},
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    streamed = [e for e in client.responses.create(model=MODEL, input="weather?", tools=[WEATHER], stream=True,
                                                   extra_body={"seed": 2},
                                                   tool_choice={"type": "function", "name": "get_weather"})]
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [call.arguments] and streamed[-1].type == "response.completed"
    # the call and its output go back as items; the prompt is the chat route's for the same turns
    follow = [{"role": "user", "content": "weather?"},
              {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    r2 = client.responses.create(model=MODEL, input=follow, tools=[WEATHER], tool_choice="none",
                                 max_output_tokens=8, extra_body={"seed": 4})
    want = chat(client, [{"role": "user", "content": "weather?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": call.call_id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}}]},
                         {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}],
                tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
                tool_choice="none", max_tokens=8, seed=4)
    assert r2.usage.input_tokens == want.usage.prompt_tokens
    assert r2.output_text == want.choices[0].message.content


@pytest.mark.parametrize("kw,param,words", [
    (dict(text={"format": {"type": "json_object"}}, max_output_tokens=1), "text", "at least 2 tokens"),
    (dict(input=[]), "input", "input is empty"),
    (dict(max_output_tokens=10**6), "max_output_tokens", "max_output_tokens"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(max_output_tokens=2, tools=[WEATHER], tool_choice="required"), "tools", "over max_output_tokens=2"),
    (dict(max_output_tokens=4, extra_body={"min_tokens": 10}), "min_tokens", "(max_output_tokens)"),
    (dict(tools=[{"type": "web_search"}]), "tools", "type 'web_search' is a built-in tool"),
])
def test_refusals_name_the_responses_field(client, kw, param, words):
    body = {"model": MODEL, "input": "hi", **kw}
    with pytest.raises(BadRequestError) as e:
        client.responses.create(**body)
    assert e.value.body["param"] == param and words in e.value.body["message"]
    assert "max_tokens" not in e.value.body["message"]
    with pytest.raises(NotFoundError):
        client.responses.create(model="other", input="hi")


def test_extensions_pass_through(client):
    """min_tokens and logit_bias reach the engine through the Responses route as through chat."""
    eos = 1  # the tiny checkpoint's first EOS id
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=20,
                                extra_body={"seed": 1, "logit_bias": {str(eos): 100}, "min_tokens": 6})
    assert r.usage.output_tokens == 7 and len(r.output_text) == 6 and r.status == "completed"


def test_previous_response_id_continues_the_conversation(client):
    import httpx

    r1 = client.responses.create(model=MODEL, instructions="Be brief.", input="Name a colour.",
                                 max_output_tokens=12, extra_body={"seed": 1})
    assert r1.store is True
    r2 = client.responses.create(model=MODEL, previous_response_id=r1.id, input="Another one?",
                                 max_output_tokens=12, extra_body={"seed": 2})
    # the earlier turns come back without the earlier instructions (OpenAI's rule)
    want = chat(client, [{"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": r1.output_text},
                         {"role": "user", "content": "Another one?"}], max_tokens=12, seed=2)
    assert r2.previous_response_id == r1.id and r2.usage.input_tokens == want.usage.prompt_tokens
    assert r2.output_text == want.choices[0].message.content
    r3 = client.responses.create(model=MODEL, previous_response_id=r2.id, input="And a third?",
                                 max_output_tokens=12, extra_body={"seed": 3})
    assert r3.usage.input_tokens > r2.usage.input_tokens + r2.usage.output_tokens
    assert client.responses.retrieve(r1.id).output_text == r1.output_text
    base = str(client.base_url).rstrip("/")
    gone = httpx.delete(f"{base}/responses/{r1.id}").json()
    assert gone == {"id": r1.id, "object": "response", "deleted": True}
    with pytest.raises(NotFoundError) as e:
        client.responses.create(model=MODEL, previous_response_id=r1.id, input="hi")
    assert e.value.body["param"] == "previous_response_id" and "not found" in e.value.body["message"]
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r1.id)
    unstored = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=4)
    assert unstored.store is False
    with pytest.raises(NotFoundError):
        client.responses.retrieve(unstored.id)


def test_streamed_responses_are_stored_too(client):
    events = list(client.responses.create(model=MODEL, input="Tell me more", max_output_tokens=20, stream=True,
                                          extra_body={"seed": 4}))
    final = events[-1].response
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_the_store_keeps_the_newest(client, monkeypatch):
    from canvaslm.server import responses

    monkeypatch.setattr(responses, "STORE_SIZE", 2)
    ids = [client.responses.create(model=MODEL, input=f"q{i}", max_output_tokens=4).id for i in range(3)]
    with pytest.raises(NotFoundError):
        client.responses.retrieve(ids[0])
    assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


def test_tools_without_call_tokens_get_advice_in_responses_terms(client):
    """The tiny tokenizer has no call tokens, so "auto" is refused; the advice named chat's tool_choice shape
    ({"type": "function", "function": {...}}), which this route refuses in turn. Following it now works."""
    with pytest.raises(BadRequestError) as e:
        client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], max_output_tokens=16)
    message = e.value.body["message"]
    assert e.value.body["param"] == "tool_choice"
    assert '"required"' in message and '{"type": "function", "name": ...}' in message and '"none"' in message
    assert "'function':" not in message
    for choice in ("required", {"type": "function", "name": "get_weather"}, "none"):
        r = client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice=choice,
                                    max_output_tokens=64, extra_body={"seed": 1})
        assert r.status in ("completed", "incomplete")
