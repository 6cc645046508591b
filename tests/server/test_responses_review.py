"""/v1/responses, as a review found it: a reply's `output` replayed as input renders the prompt that
previous_response_id and chat render (text and calls one assistant turn), streamed deltas carry their own
tokens' log-probs (a reply sent whole too), and the fields that ask for what this server does not keep
(`conversation`, `prompt`, `background`) are refused by name. The engine is scripted (as in
tests/sampling/test_reasoning.py) so that the reply writes text, a thought and a call."""

from __future__ import annotations

import pytest

from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
from canvaslm.tool_parser import CALL_CLOSE, CALL_OPEN, QUOTE

openai = pytest.importorskip("openai")

CALL = f"{CALL_OPEN}call:get_weather{{city:{QUOTE}Oslo{QUOTE}}}{CALL_CLOSE}"
TOOL = {"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("think"), extra_specials=(
        CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, QUOTE, "<|tool_response>"))


@pytest.fixture(scope="module")
def server(think_dir, one_thread):
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(think_dir, device="cpu", served_model_name="tiny")) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def script(monkeypatch, state, text: str, cuts=(1, 4, 9)) -> list:
    """state.engine answers every request with `text`'s ids, committed in pieces cut at `cuts`, then EOS;
    returns the list each request's prompt ids are appended to."""
    from canvaslm.engine.engine import Commit, Finish

    tok = state.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_ids[0]]
    bounds = [0, *[c for c in cuts if c < len(ids)], len(ids)]
    prompts = []

    def submit(request, queue, loop):
        prompts.append(list(request.prompt_ids))
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            loop.call_soon_threadsafe(queue.put_nowait, Commit(request.request_id, k, tuple(ids[a:b])))
        loop.call_soon_threadsafe(queue.put_nowait, Finish(request.request_id, "stop", len(ids), len(bounds)))

    monkeypatch.setattr(state.engine, "submit", submit)
    return prompts


@pytest.mark.parametrize("thought", ["", "need the weather"])
def test_replayed_output_renders_the_stored_prompt(client, server, monkeypatch, thought):
    reply = (f"{CHANNEL_OPEN}thought\n{thought}{CHANNEL_CLOSE}" if thought else "") + "Let me check." + CALL
    script(monkeypatch, server.state, reply)
    effort = {"reasoning": {"effort": "high"}} if thought else {}
    r = client.responses.create(model="tiny", input="weather?", tools=[TOOL], **effort)
    assert [o.type for o in r.output] == ["reasoning"] * bool(thought) + ["message", "function_call"]
    fc = r.output[-1]
    result = {"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}
    prompts = script(monkeypatch, server.state, "ok")
    client.responses.create(model="tiny", previous_response_id=r.id, tools=[TOOL], input=[result], **effort)
    replayed = [{"role": "user", "content": "weather?"}, *(o.model_dump(exclude_none=True) for o in r.output), result]
    client.responses.create(model="tiny", tools=[TOOL], input=replayed, **effort)
    client.chat.completions.create(model="tiny", tools=[CHAT_TOOL], **({"reasoning_effort": "high"} if thought else {}),
                                   messages=[{"role": "user", "content": "weather?"},
                                             {"role": "assistant", "content": "Let me check.", "tool_calls": [
                                                 {"id": fc.call_id, "type": "function", "function": {
                                                     "name": "get_weather", "arguments": fc.arguments}}]},
                                             {"role": "tool", "tool_call_id": fc.call_id, "content": "sunny"}])
    stateful, stateless, chat = prompts
    assert stateless == stateful == chat
    assert server.state.tokenizer.decode(stateless).count("Let me check.call:get_weather") == 1  # one turn


def test_text_after_a_call_is_a_message_item_after_it_and_replays_as_one_turn(client, server, monkeypatch):
    """A reply that writes text after its call: the text is a message item after the function_call (it was
    joined to the text before the call), whole and streamed, and the replayed output renders the prompt that
    previous_response_id renders (one assistant turn)."""
    script(monkeypatch, server.state, "Let me check." + CALL + "Then more.")
    r = client.responses.create(model="tiny", input="weather?", tools=[TOOL])
    assert [o.type for o in r.output] == ["message", "function_call", "message"]
    assert [o.content[0].text for o in r.output if o.type == "message"] == ["Let me check.", "Then more."]
    script(monkeypatch, server.state, "Let me check." + CALL + "Then more.")
    with client.responses.stream(model="tiny", input="weather?", tools=[TOOL]) as stream:
        done = stream.get_final_response()
    assert [o.type for o in done.output] == ["message", "function_call", "message"]
    fc = r.output[1]
    result = {"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}
    prompts = script(monkeypatch, server.state, "ok")
    client.responses.create(model="tiny", previous_response_id=r.id, tools=[TOOL], input=[result])
    replayed = [{"role": "user", "content": "weather?"}, *(o.model_dump(exclude_none=True) for o in r.output), result]
    client.responses.create(model="tiny", tools=[TOOL], input=replayed)
    stateful, stateless = prompts
    assert stateless == stateful


def test_a_function_call_joins_the_assistant_message_before_it():
    from canvaslm.server.protocol import ResponsesRequest
    from canvaslm.server.responses import to_chat

    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    body = ResponsesRequest(model="m", input=[
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "text"},
        {"type": "reasoning", "id": "rs_1", "summary": []}, call, {**call, "call_id": "c2"},
        {"type": "function_call_output", "call_id": "c1", "output": "r1"}])
    chat, turns = to_chat(body)
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool"]
    assert chat.messages[1].content == "text" and [c.id for c in chat.messages[1].tool_calls] == ["c1", "c2"]
    assert [t["role"] for t in turns] == roles
    # a call after a user message still opens its own assistant turn; a stored turn is not changed
    alone, _ = to_chat(ResponsesRequest(model="m", input=[{"role": "user", "content": "q"}, call]))
    assert [m.role for m in alone.messages] == ["user", "assistant"] and alone.messages[1].content is None
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    later, turns = to_chat(ResponsesRequest(model="m", input=[call]), history)
    assert [m.role for m in later.messages] == ["user", "assistant", "assistant"] and "tool_calls" not in history[1]
    assert turns[0]["tool_calls"][0]["id"] == "c1"


@pytest.mark.parametrize("tools", [None, [TOOL]])  # text streamed as it commits / a reply that may call: sent whole
def test_streamed_deltas_carry_their_own_logprobs(client, server, monkeypatch, tools):
    script(monkeypatch, server.state, "Hello there, friend.")
    kw = dict(model="tiny", input="q", include=["message.output_text.logprobs"], top_logprobs=2,
              **({"tools": tools} if tools else {}))
    whole = client.responses.create(**kw).output[0].content[0].logprobs
    events = list(client.responses.create(**kw, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert len(deltas) == (1 if tools else 4)
    assert all(d.logprobs for d in deltas)  # each delta its own tokens' entries

    def tokens(entries):
        return [(e.token, [t.token for t in e.top_logprobs]) for e in entries]

    def logprobs(entries):  # a pass over a longer reply may differ in the last float bits
        return pytest.approx([e.logprob for e in entries], abs=1e-4)

    streamed = [e for d in deltas for e in d.logprobs]
    assert tokens(streamed) == tokens(done.logprobs) == tokens(whole)
    assert [e.logprob for e in streamed] == logprobs(done.logprobs) and [e.logprob for e in whole] == logprobs(streamed)
    assert "".join(e.token for e in whole) == "Hello there, friend."


@pytest.mark.parametrize("field, value, words", [
    ("conversation", "conv_123", "previous_response_id"),
    ("conversation", {"id": "conv_123"}, "previous_response_id"),
    ("prompt", {"id": "pmpt_123", "variables": {"city": "Oslo"}}, "instructions"),
    ("background", True, "stream"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_fields_this_server_cannot_honour_are_refused_by_name(client, server, monkeypatch, field, value, words,
                                                              stream):
    prompts = script(monkeypatch, server.state, "ok")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="hi", stream=stream, **{field: value})
    err = e.value.body
    assert err["param"] == field and field in err["message"] and words in err["message"]
    assert prompts == []  # refused before anything ran
    r = client.responses.create(model="tiny", input="hi", background=False)  # what it already does: fine
    assert r.status == "completed" and r.output_text == "ok"
