"""Thought channels (`<|channel>thought\\n...<channel|>`, Gemma 4's thinking syntax): a chat reply's thought goes to
`reasoning_content` (whole and streamed, before the answer), the answer and tool calls are read from the rest, and
the label never reaches the text. A random model writes no channel, so the server tests script the engine's
commits (the real run_choices reads them); the splitter is tested on its own."""

from __future__ import annotations

import json

import pytest

from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN, ThoughtSplitter
from canvaslm.tool_parser import CALL_CLOSE, CALL_OPEN, QUOTE

openai = pytest.importorskip("openai")

OPEN, CLOSE = CHANNEL_OPEN, CHANNEL_CLOSE
THINKING = f"{OPEN}thought\nLet me think: 2+2.{CLOSE}It is 4."
EMPTY = f"{OPEN}thought\n{CLOSE}Paris."  # what Gemma 4 26B-A4B writes with thinking off
CALLING = f"{OPEN}thought\nneed the weather{CLOSE}{CALL_OPEN}call:get_weather{{city:{QUOTE}Oslo{QUOTE}}}{CALL_CLOSE}"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("think"), extra_specials=(
        OPEN, CLOSE, CALL_OPEN, CALL_CLOSE, QUOTE, "<|tool_response>"))


@pytest.fixture(scope="module")
def tok(think_dir):
    from canvaslm.tokenizer import Tokenizer

    return Tokenizer.from_dir(think_dir)


def test_splitter_reads_the_channel(tok):
    s = ThoughtSplitter.for_tokenizer(tok)
    ids = tok.encode(THINKING, add_special_tokens=False)
    split = s.split(ids)
    assert split.closed and tok.decode(split.content) == "It is 4."
    assert s.thought_text(split.thought) == "Let me think: 2+2."
    assert s.split(tok.encode("plain", add_special_tokens=False)).thought is None
    cut = s.split(tok.encode(f"{OPEN}thought\nstill", add_special_tokens=False))  # open: all of it is thought
    assert not cut.closed and cut.content == [] and s.thought_text(cut.thought) == "still"
    label = s.split(tok.encode(f"{OPEN}thou", add_special_tokens=False)).thought
    assert s.thought_text(label) == ""  # the label goes on, or a budget cut it
    empty = s.split(tok.encode(EMPTY, add_special_tokens=False))
    assert s.thought_text(empty.thought) == "" and tok.decode(empty.content) == "Paris."


def test_tokenizers_without_the_channel_tokens_have_no_splitter(tiny_llm):
    assert ThoughtSplitter.for_tokenizer(tiny_llm.tokenizer) is None


def _script(monkeypatch, state, tok, text: str, cuts=(1, 4, 9)):
    """state.engine answers every request with `text`'s ids, committed in pieces cut at `cuts`, then EOS."""
    from canvaslm.engine.engine import Commit, Finish

    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_ids[0]]
    bounds = [0, *cuts, len(ids)]

    def submit(request, queue, loop):
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            loop.call_soon_threadsafe(queue.put_nowait, Commit(request.request_id, k, tuple(ids[a:b])))
        loop.call_soon_threadsafe(queue.put_nowait, Finish(request.request_id, "stop", len(ids), len(bounds)))

    monkeypatch.setattr(state.engine, "submit", submit)


def _stream(c, **kwargs):
    reasoning, content, order = "", "", []
    for ch in c.chat.completions.create(stream=True, **kwargs):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        extra = d.model_extra or {}
        if extra.get("reasoning_content"):
            assert extra["reasoning"] == extra["reasoning_content"]
            reasoning += extra["reasoning_content"]
            order.append("r")
        if d.content:
            content += d.content
            order.append("c")
    return reasoning, content, order


def test_chat_reasoning_whole_and_streamed(think_dir, tok, monkeypatch):
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        kwargs = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "2+2?"}],
                      extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        _script(monkeypatch, srv.state, tok, THINKING)
        r = c.chat.completions.create(**kwargs)
        msg = r.choices[0].message
        assert msg.content == "It is 4."
        assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(THINKING.split("It")[0],
                                                                                    add_special_tokens=False))
        assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == "Let me think: 2+2."
        reasoning, content, order = _stream(c, **kwargs)
        assert (reasoning, content) == ("Let me think: 2+2.", "It is 4.")
        assert order == sorted(order, reverse=True)  # the thought streams first ("r" > "c")
        hidden = c.chat.completions.create(**{**kwargs, "extra_body": {"include_reasoning": False}}).choices[0]
        assert hidden.message.content == "It is 4." and "reasoning_content" not in (hidden.message.model_extra or {})
        assert _stream(c, **{**kwargs, "extra_body": {"include_reasoning": False}})[:2] == ("", "It is 4.")
        _script(monkeypatch, srv.state, tok, EMPTY, cuts=(1, 2))  # thinking off: an empty channel, no label left
        msg = c.chat.completions.create(**kwargs).choices[0].message
        assert msg.content == "Paris." and "reasoning_content" not in (msg.model_extra or {})
        assert _stream(c, **kwargs)[:2] == ("", "Paris.")
        _script(monkeypatch, srv.state, tok, THINKING)  # raw completions are not chat replies: left as they are
        text = c.completions.create(model=srv.state.model_name, prompt="2+2?").choices[0].text
        assert text == "thought\nLet me think: 2+2.It is 4."
        srv.state.reasoning = False  # --reasoning-parser none
        assert c.chat.completions.create(**kwargs).choices[0].message.content == text


def test_a_thought_then_a_tool_call(think_dir, tok, monkeypatch):
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        _script(monkeypatch, srv.state, tok, CALLING, cuts=(3, 12, 20))
        kwargs = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER])
        ch = c.chat.completions.create(**kwargs).choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.model_extra["reasoning_content"] == "need the weather"
        assert [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls] == \
            [("get_weather", {"city": "Oslo"})]
        assert not ch.message.content
        reasoning, content, _ = _stream(c, **kwargs)
        assert reasoning == "need the weather" and content == ""


def test_parallel_tool_calls_false_keeps_the_first_call(think_dir, tok, monkeypatch):
    from canvaslm.server.launch import BackgroundServer, build_state

    two = "".join(f"{CALL_OPEN}call:get_weather{{city:{QUOTE}{c}{QUOTE}}}{CALL_CLOSE}" for c in ("Oslo", "Rome"))
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        _script(monkeypatch, srv.state, tok, two, cuts=(5, 20, 30))
        kwargs = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER])

        def cities(**kw):
            calls = c.chat.completions.create(**kwargs, **kw).choices[0].message.tool_calls
            streamed = [d.function.arguments for ch in c.chat.completions.create(**kwargs, **kw, stream=True)
                        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices]
            assert streamed == [t.function.arguments for t in calls]
            return [json.loads(t.function.arguments)["city"] for t in calls]

        assert cities() == ["Oslo", "Rome"]
        assert cities(parallel_tool_calls=False) == ["Oslo"]


def test_a_prefilled_thought_and_a_channel_closed_in_its_label(think_dir, tok, monkeypatch):
    """A reply that continues a thought the prompt left open (continue_final_message) has its answer as content
    and the rest of the thought as reasoning; a channel closed inside its label (a tiny budget) has no thought."""
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        _script(monkeypatch, srv.state, tok, f" think.{CLOSE}It is 4.")
        msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": f"{OPEN}thought\nLet me"}]
        r = c.chat.completions.create(model=srv.state.model_name, messages=msgs, extra_body={
            "add_generation_prompt": False, "continue_final_message": True})
        msg = r.choices[0].message
        assert msg.content == "It is 4." and msg.model_extra["reasoning_content"] == " think."
        assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(f" think.{CLOSE}",
                                                                                    add_special_tokens=False))
        _script(monkeypatch, srv.state, tok, f"{OPEN}tho{CLOSE}Answer.")
        msg = c.chat.completions.create(model=srv.state.model_name, messages=msgs[:1]).choices[0].message
        assert msg.content == "Answer." and "reasoning_content" not in (msg.model_extra or {})


def test_responses_follow_ups_keep_what_was_stored(think_dir, tok, monkeypatch):
    """A follow-up's input does not change the stored turns it continues; a streamed tool call is stored with the
    call_id the client got; output_text log-probs are the text's (not the thought's), also beside tools; a
    thought written after the answer began streams as its own item; an alias is answered under the served name."""
    from canvaslm.server.launch import BackgroundServer, build_state

    tool = {"type": "function", **WEATHER["function"]}
    with BackgroundServer(build_state(think_dir, device="cpu", served_model_name="tiny")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        store, srv.state.aliases = srv.state.response_store, ("tiny-alias",)  # --served-model-name tiny tiny-alias
        _script(monkeypatch, srv.state, tok, CALLING, cuts=(3, 12, 20))
        first = c.responses.create(model="tiny-alias", input="weather?", tools=[tool])
        assert first.model == "tiny"
        call = next(o for o in first.output if o.type == "function_call")
        before = json.dumps(store[first.id]["turns"])
        _script(monkeypatch, srv.state, tok, "ok")
        c.responses.create(model="tiny", previous_response_id=first.id, tools=[tool], input=[
            {"type": "function_call", "call_id": "call_extra", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
        assert json.dumps(store[first.id]["turns"]) == before
        _script(monkeypatch, srv.state, tok, CALLING, cuts=(3, 12, 20))
        final = list(c.responses.create(model="tiny", input="weather?", tools=[tool], stream=True))[-1].response
        sent = [o.call_id for o in final.output if o.type == "function_call"]
        assert sent and sent == [t["id"] for t in store[final.id]["turns"][-1]["tool_calls"]]
        include = ["message.output_text.logprobs"]
        for text, kw in [(THINKING, dict(reasoning={"effort": "high"})), ("Hello there.", dict(tools=[tool]))]:
            _script(monkeypatch, srv.state, tok, text)
            r = c.responses.create(model="tiny", input="q", include=include, **kw)
            part = next(o for o in r.output if o.type == "message").content[0]
            assert "".join(lp.token for lp in part.logprobs) == part.text == text.split(CLOSE)[-1]
        _script(monkeypatch, srv.state, tok, f"Hi{OPEN}thought\nhmm{CLOSE}Bye")
        events = list(c.responses.create(model="tiny", input="q", reasoning={"effort": "high"}, stream=True))
        out = events[-1].response.output
        assert [(o.type, o.content[0].text) for o in out] == [("message", "HiBye"), ("reasoning", "hmm")]
        assert [e.output_index for e in events if e.type == "response.reasoning_text.delta"] == [1]


def test_other_apis_and_llm_chat_leave_the_thought_out_of_the_text(think_dir, tok, monkeypatch):
    import httpx

    anthropic = pytest.importorskip("anthropic")
    ollama = pytest.importorskip("ollama")
    from canvaslm import LLM
    from canvaslm.llm import GenerationResult
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        _script(monkeypatch, srv.state, tok, THINKING)
        a = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0)
        kwargs = dict(model=srv.state.model_name, max_tokens=64, messages=[{"role": "user", "content": "q"}],
                      thinking={"type": "enabled", "budget_tokens": 1024})
        with a.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
        for msg in (a.messages.create(**kwargs), streamed):
            assert [b.type for b in msg.content] == ["thinking", "text"]
            assert (msg.content[0].thinking, msg.content[1].text) == ("Let me think: 2+2.", "It is 4.")
        _script(monkeypatch, srv.state, tok, CALLING, cuts=(3, 12, 20))
        with a.messages.stream(**kwargs, tools=[{"name": "get_weather", "input_schema": WEATHER["function"][
                "parameters"]}]) as stream:
            called = stream.get_final_message()
        assert [b.type for b in called.content] == ["thinking", "tool_use"] and called.content[1].input == \
            {"city": "Oslo"}
        # a thought begun after the text, committed with it: the blocks keep the model's order, each closed once
        _script(monkeypatch, srv.state, tok, f"Hi{OPEN}thought\nhmm{CLOSE}Bye", cuts=(13,))
        with httpx.stream("POST", srv.base_url + "/v1/messages", json={**kwargs, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        blocks, closed = [], set()
        for e in events:
            if e["type"].startswith("content_block"):
                assert e["index"] not in closed
            if e["type"] == "content_block_start":
                assert e["index"] == len(blocks)
                blocks.append(e["content_block"]["type"])
            elif e["type"] == "content_block_stop":
                closed.add(e["index"])
        assert blocks == ["text", "thinking", "text"] and closed == {0, 1, 2}
        whole = a.messages.create(**kwargs)
        assert [(b.type, getattr(b, "text", None) or b.thinking) for b in whole.content] == \
            [("text", "Hi"), ("thinking", "hmm"), ("text", "Bye")]
        _script(monkeypatch, srv.state, tok, THINKING)
        o = ollama.Client(host=srv.base_url)
        q = [{"role": "user", "content": "q"}]
        whole = o.chat(model=srv.state.model_name, messages=q, think=True).message
        assert (whole.content, whole.thinking) == ("It is 4.", "Let me think: 2+2.")
        parts = list(o.chat(model=srv.state.model_name, messages=q, think=True, stream=True))
        assert "".join(p.message.thinking or "" for p in parts) == "Let me think: 2+2."
        assert "".join(p.message.content or "" for p in parts) == "It is 4."
        gen = o.generate(model=srv.state.model_name, prompt="q", think=True)
        assert (gen.response, gen.thinking) == ("It is 4.", "Let me think: 2+2.")
        assert "thinking" in o.show(srv.state.model_name).capabilities
    llm = LLM(think_dir, device="cpu")
    ids = tok.encode(THINKING, add_special_tokens=False)
    monkeypatch.setattr(llm, "generate", lambda prompts, params=None, **kw: [
        GenerationResult(prompts[0], ids, tok.decode(ids), "stop", 1.0, 1)])
    res = llm.chat([{"role": "user", "content": "2+2?"}])
    assert (res.text, res.reasoning) == ("It is 4.", "Let me think: 2+2.")


def test_ollama_think_renders_the_template_with_enable_thinking():
    from canvaslm.server.ollama import ChatBody, _sampling

    msgs = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    for think, want in ((True, True), ("high", True), (False, False)):
        fields = _sampling(ChatBody(model="m", messages=[], think=think), dict(msgs))
        assert fields["chat_template_kwargs"] == {"enable_thinking": want}
    assert "chat_template_kwargs" not in _sampling(ChatBody(model="m", messages=[]), dict(msgs))


def test_responses_api_reasoning_items(think_dir, tok, monkeypatch):
    """The Responses API (what Codex CLI speaks): reasoning.effort turns thinking on, the thought is a reasoning
    item before the message (whole and streamed, reasoning_text events first), its tokens are usage's
    reasoning_tokens, and reasoning items sent back as input are dropped."""
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        _script(monkeypatch, srv.state, tok, THINKING)
        kw = dict(model=srv.state.model_name, input="2+2?", reasoning={"effort": "medium", "summary": "auto"},
                  include=["reasoning.encrypted_content"])
        r = c.responses.create(**kw)
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "Let me think: 2+2." and r.output_text == "It is 4."
        assert r.usage.output_tokens_details.reasoning_tokens == len(tok.encode(THINKING.split("It")[0],
                                                                                add_special_tokens=False))
        assert r.reasoning.effort == "medium"
        events = list(c.responses.create(**kw, stream=True))
        kinds = [e.type for e in events]
        assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Let me think: 2+2."
        final = events[-1].response
        assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == "It is 4."
        assert [e.output_index for e in events if e.type == "response.output_text.delta"] == \
            [1] * kinds.count("response.output_text.delta")
        again = c.responses.create(model=srv.state.model_name, input=[
            {"role": "user", "content": "2+2?"}, r.output[0].model_dump(exclude_none=True),
            {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "and 3+3?"}])
        assert again.output_text == "It is 4."  # the scripted engine; the point: the reasoning item was accepted
        _script(monkeypatch, srv.state, tok, CALLING, cuts=(3, 12, 20))
        called = c.responses.create(**kw, tools=[{"type": "function", **WEATHER["function"]}])
        assert [o.type for o in called.output] == ["reasoning", "function_call"]
        streamed = list(c.responses.create(**kw, tools=[{"type": "function", **WEATHER["function"]}], stream=True))
        assert [o.type for o in streamed[-1].response.output] == ["reasoning", "function_call"]
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model=srv.state.model_name, input="q", reasoning={"effort": "extreme"})
        assert e.value.body["param"] == "reasoning"


def test_reasoning_effort_sets_enable_thinking():
    """OpenAI's reasoning_effort (chat; the Responses API's reasoning.effort becomes it): off for none / minimal,
    on otherwise; chat_template_kwargs' own enable_thinking wins."""
    from canvaslm.server.protocol import ChatCompletionRequest

    msgs = [{"role": "user", "content": "q"}]
    for effort, want in (("none", False), ("minimal", False), ("low", True), ("high", True)):
        body = ChatCompletionRequest(model="m", messages=msgs, reasoning_effort=effort)
        assert body.template_kwargs()["enable_thinking"] is want
    assert "enable_thinking" not in ChatCompletionRequest(model="m", messages=msgs).template_kwargs()
    both = ChatCompletionRequest(model="m", messages=msgs, reasoning_effort="high",
                                 chat_template_kwargs={"enable_thinking": False})
    assert both.template_kwargs()["enable_thinking"] is False
    from canvaslm.server.protocol import ResponsesRequest
    from canvaslm.server.responses import to_chat

    chat, _ = to_chat(ResponsesRequest(model="m", input="q", reasoning={"effort": "minimal"}))
    assert chat.template_kwargs()["enable_thinking"] is False


def test_generate_cli_chat_keeps_the_thought_apart(think_dir, tok, monkeypatch, capsys):
    from canvaslm.cli import main
    from canvaslm.llm import LLM, GenerationResult

    ids = tok.encode(THINKING, add_special_tokens=False)

    def generate(self, prompts, params=None, **kw):
        return [GenerationResult(prompts[0], ids, tok.decode(ids), "stop", 1.0, 1)]

    monkeypatch.setattr(LLM, "generate", generate)
    assert main(["generate", str(think_dir), "--prompt", "2+2?", "--chat", "--think", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["text"], out["reasoning"]) == ("It is 4.", "Let me think: 2+2.")
    assert main(["generate", str(think_dir), "--prompt", "2+2?", "--chat"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "It is 4.\n" and "[thinking] Let me think: 2+2." in printed.err
    assert main(["generate", str(think_dir), "--prompt", "2+2?"]) == 0  # no --chat: the raw text
    assert capsys.readouterr().out == "thought\nLet me think: 2+2.It is 4.\n"


def test_anthropic_count_tokens_counts_what_thinking_adds(think_dir):
    anthropic = pytest.importorskip("anthropic")
    from canvaslm.server.launch import BackgroundServer, build_state

    state = build_state(think_dir, device="cpu")
    state.tokenizer.set_chat_template("{% if enable_thinking %}[think]{% endif %}"
                                      "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with BackgroundServer(state) as srv:
        a = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0)
        kw = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "q"}])
        plain = a.messages.count_tokens(**kw).input_tokens
        thinking = a.messages.count_tokens(**kw, thinking={"type": "enabled", "budget_tokens": 1024}).input_tokens
        assert thinking - plain == len("[think]")


def _script_ids(monkeypatch, state, answer):
    """state.engine answers each request with the ids `answer(request)` gives, committed in two pieces."""
    from canvaslm.engine.engine import Commit, Finish

    def submit(request, queue, loop):
        ids = answer(request)
        for k, part in enumerate((ids[:3], ids[3:])):
            loop.call_soon_threadsafe(queue.put_nowait, Commit(request.request_id, k, tuple(part)))
        loop.call_soon_threadsafe(queue.put_nowait, Finish(request.request_id, "stop", len(ids), 2))

    monkeypatch.setattr(state.engine, "submit", submit)


def test_tool_replies_cut_stops_as_plain_replies_do(think_dir, tok, monkeypatch):
    """With tools ("auto"), a stop string or stop token is cut from the content as without them; a forced call
    parses with skip_special_tokens false (the EOS that ends a reply is no part of its text, as in vLLM)."""
    from canvaslm.server.launch import BackgroundServer, build_state

    x = tok.encode("X", add_special_tokens=False)[0]
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        base = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "hi"}])
        _script(monkeypatch, srv.state, tok, "abcEND more text", cuts=(4, 6))
        for extra in ({}, {"tools": [WEATHER]}):
            assert c.chat.completions.create(stop=["END"], **base, **extra).choices[0].message.content == "abc"
            assert _stream(c, stop=["END"], **base, **extra)[1] == "abc"
            kept = c.chat.completions.create(stop=["END"], extra_body={"include_stop_str_in_output": True},
                                             **base, **extra)
            assert kept.choices[0].message.content == "abcEND"
        _script_ids(monkeypatch, srv.state, lambda r: tok.encode("abcX", add_special_tokens=False))
        for extra in ({}, {"tools": [WEATHER]}):
            r = c.chat.completions.create(**base, **extra, extra_body={"stop_token_ids": [x]})
            assert r.choices[0].message.content == "abc"
        _script(monkeypatch, srv.state, tok, '{"city": "Oslo"}', cuts=(3,))
        plain = c.chat.completions.create(**base, extra_body={"skip_special_tokens": False}).choices[0]
        assert plain.message.content == '{"city": "Oslo"}'  # no "<eos>"
        forced = c.chat.completions.create(**base, tools=[WEATHER], tool_choice="required",
                                           extra_body={"skip_special_tokens": False}).choices[0]
        assert forced.finish_reason == "tool_calls" and forced.message.tool_calls[0].function.arguments == \
            '{"city": "Oslo"}'


def test_min_tokens_and_stop_ids_with_a_thought(think_dir, tok, monkeypatch):
    """min_tokens counts the thought's tokens (as the EOS ban does); a stop token that ends the reply inside the
    thought is not part of the reasoning text."""
    from canvaslm.server.launch import BackgroundServer, build_state

    thought = f"{OPEN}thought\nthinking hard here{CLOSE}"
    n = len(tok.encode(thought, add_special_tokens=False))
    assert n > 15
    x = tok.encode("X", add_special_tokens=False)[0]
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        base = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "hi"}])
        _script(monkeypatch, srv.state, tok, thought + "ab STOP cd efgh", cuts=(5, 12, n + 2))
        for m in (0, 10, n + 7):  # the stop ends at output token n + 7
            r = c.chat.completions.create(stop=["STOP"], extra_body={"min_tokens": m}, **base)
            assert r.choices[0].message.content == "ab ", m
        r = c.chat.completions.create(stop=["STOP"], extra_body={"min_tokens": n + 8}, **base)
        assert r.choices[0].message.content.startswith("ab STOP cd")
        _script_ids(monkeypatch, srv.state, lambda r: tok.encode(f"{OPEN}thought\nabX", add_special_tokens=False))
        msg = c.chat.completions.create(**base, extra_body={"stop_token_ids": [x]}).choices[0].message
        assert msg.model_extra["reasoning_content"] == "ab" and not msg.content


def test_a_forced_call_after_a_thought_streams_its_header_after_the_thought(think_dir, tok, monkeypatch):
    from canvaslm.server.launch import BackgroundServer, build_state

    open_id = tok.token_to_id(OPEN)
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        kwargs = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER],
                      tool_choice="required", max_tokens=64,  # room for a thought before the call
                      extra_body={"chat_template_kwargs": {"enable_thinking": True}})

        def events():
            out = []
            for ch in c.chat.completions.create(stream=True, **kwargs):
                d = ch.choices[0].delta
                if (d.model_extra or {}).get("reasoning_content"):
                    out.append("reasoning")
                if d.tool_calls and d.tool_calls[0].function.name:
                    out.append("header")
                if ch.choices[0].finish_reason:
                    out.append(ch.choices[0].finish_reason)
            return out

        thought = tok.encode("thought\nneed the weather", add_special_tokens=False)
        _script_ids(monkeypatch, srv.state, lambda r: [*thought, tok.eos_ids[0]])  # the reply ends in the thought
        assert "tool_calls" not in c.chat.completions.create(**kwargs).choices[0].message.model_dump(exclude_none=True)
        assert events() == ["reasoning", "stop"]
        call = tok.encode('{"city": "Oslo"}', add_special_tokens=False)
        _script_ids(monkeypatch, srv.state, lambda r: [*thought, tok.token_to_id(CLOSE)]
                    if r.prompt_ids[-1] == open_id else [*call, tok.eos_ids[0]])
        ch = c.chat.completions.create(**kwargs).choices[0]
        assert ch.finish_reason == "tool_calls" and json.loads(ch.message.tool_calls[0].function.arguments) == \
            {"city": "Oslo"}
        assert events() == ["reasoning", "header", "tool_calls"]


def test_history_thoughts_reach_the_template():
    from canvaslm.server.protocol import ChatCompletionRequest

    for key in ("reasoning_content", "reasoning", "thinking"):
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: "THOUGHT"}]})
        assert body.message_dicts()[1][key] == "THOUGHT"
