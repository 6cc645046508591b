"""tool_choice "auto": calls in the model's own syntax (`<|tool_call>call:NAME{...}<tool_call|>`, strings between
`<|"|>` tokens) are read out of its tokens, in the server (whole and streamed) and in LLM.chat. A random model
does not write calls, so the end-to-end tests script the committed tokens; the parser is tested on its own."""

from __future__ import annotations

import json

import pytest

from canvaslm.tool_parser import (CALL_CLOSE, CALL_OPEN, QUOTE, NativeSyntaxError, NativeToolParser, declared_name,
                                  parse_call)

openai = pytest.importorskip("openai")

NATIVE = (CALL_OPEN, CALL_CLOSE, QUOTE, "<|tool_response>")
Q = QUOTE
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}}}
SCRIPT = (f"Let me check.{CALL_OPEN}call:get_weather{{city:{Q}Oslo, NO{Q},unit:{Q}c{Q}}}{CALL_CLOSE}"
          f"{CALL_OPEN}call:get_weather{{city:{Q}Bergen{Q},days:[1,2.5],ok:true,x:null}}{CALL_CLOSE}")
WANT = [("get_weather", {"city": "Oslo, NO", "unit": "c"}),
        ("get_weather", {"city": "Bergen", "days": [1, 2.5], "ok": True, "x": None})]


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("native"), extra_specials=NATIVE)


@pytest.fixture(scope="module")
def tok(native_dir):
    from canvaslm.tokenizer import Tokenizer

    return Tokenizer.from_dir(native_dir)


def test_parse_call_reads_the_native_syntax():
    assert parse_call(f"call:f{{a:{Q}x, y{Q},b:-2.5e3,c:[1,{{d:false}}],e:{{}}}}") == \
        ("f", json.dumps({"a": "x, y", "b": -2500.0, "c": [1, {"d": False}], "e": {}}))
    assert parse_call(f"call:g{{{Q}quoted key{Q}:1}}") == ("g", '{"quoted key": 1}')
    for bad in ("call:f{a:}", "call:{a:1}", "f{a:1}", "call:f{a:1", "call:f{a:1} x", "call:f{a 1}",
                f"call:f{{a:{Q}open}}"):
        with pytest.raises(NativeSyntaxError):
            parse_call(bad)


@pytest.mark.parametrize("body, want", [
    (f"call:terminal(command:{Q}ls -a{Q})", {"command": "ls -a"}),  # vLLM #53642's
    ('call:terminal(command="ls -a", n = 2)', {"command": "ls -a", "n": 2}),
    ('call:f( a = 1 , b : [1, "x}"] )', {"a": 1, "b": [1, "x}"]}),
    ('call:f({"city": "Oslo", "n": 1})', {"city": "Oslo", "n": 1}),
    ("call:f()", {}),
    ('call:f{"content": "has } brace", \'k\': \'it\\\'s\'}', {"content": "has } brace", "k": "it's"}),
    ('call:f{city:"New, York", items:["a,b","c"], e:"\\u00e9\\n"}', {"city": "New, York", "items": ["a,b", "c"],
                                                                     "e": "\u00e9\n"}),
], ids=["parens-colon", "parens-equals", "parens-nested", "parens-object", "parens-empty", "json-and-single-quotes",
        "json-escapes"])
def test_parse_call_reads_the_drift_gemma_4_writes_under_long_prompts(body, want):
    """Parenthesised argument lists and JSON- or single-quoted strings are read as calls (before, the block
    stayed text and an agent's loop ended with no call)."""
    name, args = parse_call(body)
    assert json.loads(args) == want and name in ("f", "terminal")


@pytest.mark.parametrize("body", ["call:f(a=1", "call:f(a=1) x", 'call:f{a:"x}', "call:f{a:'x}", "call:f(a 1)",
                                  "call:f{a=1}", "call:(a=1)", "call:f({a:1}", "call:f(a 1, b=2)", "call:f{a 1, b:2}"])
def test_drift_that_is_not_a_whole_call_stays_text(body):
    with pytest.raises(NativeSyntaxError):
        parse_call(body)


@pytest.mark.parametrize("body", ["call:f{a:1e999}", "call:f{a:-1e400}", "call:f{a:[1,{b:1E400}]}"])
def test_parse_call_refuses_numbers_out_of_json_range(body):
    with pytest.raises(NativeSyntaxError, match="out of JSON's range"):
        parse_call(body)


@pytest.mark.parametrize("args, words", [("a:" + "9" * 5000, "too many digits"),
                                         ("a:" + "[" * 1000 + "]" * 1000, "nested more than 64 deep"),
                                         ("a:" + "{b:" * 70 + "1" + "}" * 70, "nested more than 64 deep")],
                         ids=["5000-digits", "deep-array", "deep-object"])
def test_malformed_calls_stay_text(tok, args, words):
    """A call with an integer past Python's digit limit, or nested past MAX_DEPTH, is no call: parse_call
    refuses it and split keeps the block as text (they were a ValueError / RecursionError out of split)."""
    with pytest.raises(NativeSyntaxError, match=words):
        parse_call(f"call:f{{{args}}}")
    block = f"{CALL_OPEN}call:f{{{args}}}{CALL_CLOSE}"
    text, calls, open_ = NativeToolParser.for_tokenizer(tok).split(tok.encode("hi " + block, add_special_tokens=False))
    assert text == "hi " + block and calls == [] and not open_
    deep = "[" * 63 + "]" * 63
    assert parse_call(f"call:f{{a:{deep}}}") == ("f", json.dumps({"a": json.loads(deep)}))


def test_split_keeps_text_and_reads_calls(tok):
    p = NativeToolParser.for_tokenizer(tok)
    ids = tok.encode(SCRIPT + " done", add_special_tokens=False)
    text, calls, open_ = p.split(ids)
    assert text == "Let me check. done" and not open_
    assert [(n, json.loads(a)) for n, a in calls] == WANT
    broken = tok.encode(f"a{CALL_OPEN}call:f{{x:}}{CALL_CLOSE}b", add_special_tokens=False)
    assert p.split(broken) == (f"a{CALL_OPEN}call:f{{x:}}{CALL_CLOSE}b", [], False)  # not a call: stays text
    drift = tok.encode(f"a{CALL_OPEN}call:f(x=\"1\"){CALL_CLOSE}b", add_special_tokens=False)
    assert p.split(drift) == ("ab", [("f", '{"x": "1"}')], False)
    unfinished = tok.encode(f"a{CALL_OPEN}call:f{{x:1", add_special_tokens=False)
    assert p.split(unfinished) == ("a", [], True)
    assert p.split(unfinished, final=True) == (f"a{CALL_OPEN}call:f{{x:1", [], False)


def test_tokenizers_without_the_call_tokens_have_no_parser(tiny_llm):
    assert NativeToolParser.for_tokenizer(tiny_llm.tokenizer) is None


@pytest.fixture
def scripted(monkeypatch, tok):
    """The server's engine output replaced by SCRIPT's tokens, committed in three parts."""
    import canvaslm.server.app as app
    import canvaslm.server.serving as serving

    ids = tok.encode(SCRIPT, add_special_tokens=False) + [tok.eos_ids[0]]
    parts = [ids[:9], ids[9:30], ids[30:]]

    async def run_choices(state, choices, is_disconnected=None):
        for part in parts:
            for c in choices:
                c.tracker.add(part)
                text = c.tracker.delta(final=part is parts[-1])
                if text:
                    yield "delta", c.index, text
        for c in choices:
            c.finish_reason = "stop"
            yield "finish", c.index, "stop"

    import canvaslm.server.anthropic as anthropic_routes
    import canvaslm.server.ollama as ollama_routes

    monkeypatch.setattr(app, "run_choices", run_choices)  # the stream's loop
    monkeypatch.setattr(serving, "run_choices", run_choices)  # run_to_end's
    monkeypatch.setattr(anthropic_routes, "run_choices", run_choices)
    monkeypatch.setattr(ollama_routes, "run_choices", run_choices)


def test_server_auto_reads_calls_whole_and_streamed(native_dir, scripted):
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(native_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        kwargs = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "weather?"}],
                      tools=[WEATHER])
        r = c.chat.completions.create(**kwargs)  # no tool_choice: "auto"
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
        assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in msg.tool_calls] == WANT
        content, calls = "", {}
        chunks = list(c.chat.completions.create(stream=True, **kwargs))
        for ch in chunks:
            d = ch.choices[0].delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                assert tc.index not in calls  # each call comes once, whole
                calls[tc.index] = (tc.function.name, json.loads(tc.function.arguments))
        assert content == "Let me check." and [calls[k] for k in sorted(calls)] == WANT
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_anthropic_and_ollama_clients_read_the_same_calls(native_dir, scripted):
    """"auto" through Anthropic's Messages API (what Claude Code sends) and Ollama's chat: the scripted
    reply's text and both calls, whole and streamed, in each API's own shape."""
    anthropic = pytest.importorskip("anthropic")
    ollama = pytest.importorskip("ollama")
    from canvaslm.server.launch import BackgroundServer, build_state

    fn = WEATHER["function"]
    with BackgroundServer(build_state(native_dir, device="cpu")) as srv:
        a = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0)
        kwargs = dict(model=srv.state.model_name, max_tokens=64, messages=[{"role": "user", "content": "weather?"}],
                      tools=[{"name": fn["name"], "input_schema": fn["parameters"]}])
        with a.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
        for msg in (a.messages.create(**kwargs), streamed):
            assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["text", "tool_use", "tool_use"]
            assert msg.content[0].text == "Let me check."
            assert [(b.name, b.input) for b in msg.content[1:]] == WANT
        o = ollama.Client(host=srv.base_url)
        chat = dict(model=srv.state.model_name, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER])
        whole = o.chat(stream=False, **chat)
        assert whole.message.content == "Let me check."
        assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls] == WANT
        last = list(o.chat(stream=True, **chat))[-1]
        assert last.done and [(c.function.name, dict(c.function.arguments)) for c in last.message.tool_calls] == WANT


def test_auto_replies_stop_at_the_tool_response_token(native_dir, tok):
    """After its calls the model would write the tools' answers itself: an "auto" reply ends at <|tool_response>."""
    from canvaslm.server.launch import build_state
    from canvaslm.server.protocol import ChatCompletionRequest
    from canvaslm.server.serving import prepare

    state = build_state(native_dir, device="cpu")
    try:
        msgs = [{"role": "user", "content": "weather?"}]
        stop = tok.token_to_id("<|tool_response>")
        auto = prepare(state, ChatCompletionRequest(model=state.model_name, messages=msgs, tools=[WEATHER]), [[2]])
        plain = prepare(state, ChatCompletionRequest(model=state.model_name, messages=msgs), [[2]])
        assert stop in auto[0].request.eos_ids and stop not in plain[0].request.eos_ids
    finally:
        state.engine.shutdown()


def test_server_auto_with_a_real_model_gives_text(native_dir):
    """Unscripted: a random model writes no call, so the reply is its text, with the tools in the prompt."""
    from canvaslm.server.launch import BackgroundServer, build_state

    with BackgroundServer(build_state(native_dir, device="cpu")) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "weather?"}]
        r = c.chat.completions.create(model=srv.state.model_name, messages=msgs, tools=[WEATHER], seed=1,
                                      max_tokens=16)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(srv.state.tokenizer.encode_chat(msgs, tools=[WEATHER]))


def test_llm_chat_auto(native_dir, tok, monkeypatch):
    from canvaslm import LLM, SamplingParams
    from canvaslm.llm import GenerationResult

    llm = LLM(native_dir, device="cpu")
    plain = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(seed=0, max_new_tokens=8),
                     tools=[WEATHER], tool_choice="auto")
    assert plain.tool_calls is None
    ids = tok.encode(SCRIPT, add_special_tokens=False)
    monkeypatch.setattr(llm, "generate", lambda prompts, params=None, **kw: [
        GenerationResult(prompts[0], ids, tok.decode(ids), "stop", 1.0, 1)])
    res = llm.chat([{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="auto")
    assert res.text == "Let me check." and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                            for c in res.tool_calls] == WANT


def test_a_namespaced_name_is_the_declared_tool_it_ends_with():
    names = ["get_weather", "search"]
    assert [declared_name(n, names) for n in ("default_api:get_weather", "functions.search", "get_weather",
                                               "ns:other", "default_api:")] == \
        ["get_weather", "search", "get_weather", "ns:other", "default_api:"]


def test_the_server_and_llm_chat_give_a_namespaced_call_the_declared_name(native_dir, monkeypatch):
    """Gemma 4 sometimes writes `call:default_api:NAME{...}`; a client looks the name up among its tools."""
    from canvaslm.llm import LLM, GenerationResult
    from canvaslm.server.launch import BackgroundServer, build_state
    from canvaslm.testing import script_engine

    out = f"{CALL_OPEN}call:default_api:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}"
    msgs = [{"role": "user", "content": "weather?"}]
    with BackgroundServer(build_state(native_dir, device="cpu")) as srv:
        script_engine(monkeypatch, srv.state, out)
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=srv.state.model_name, messages=msgs, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0].function
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    llm = LLM(native_dir, device="cpu")
    tok = llm.tokenizer
    ids = tok.encode(out, add_special_tokens=False)
    monkeypatch.setattr(llm, "generate", lambda prompts, params=None, **kw: [
        GenerationResult(prompts[0], ids, tok.decode(ids), "stop", 1.0, 1)])
    res = llm.chat(msgs, tools=[WEATHER], tool_choice="auto")
    assert res.tool_calls[0]["function"]["name"] == "get_weather"
