"""Chat review (session 25), server side: LLM.chat and the server agree on a reply that goes on with a thought the
prompt left open and on an unfinished call read by tool_choice="auto", and render text parts alike for a template
that takes content as a string. A random model writes no channel, so the engine is scripted (the real run_choices
reads its commits), as in tests/sampling/test_reasoning.py."""

from __future__ import annotations

import pytest

from canvaslm.llm import LLM, GenerationResult, SamplingParams
from canvaslm.reasoning import CHANNEL_CLOSE as CLOSE
from canvaslm.reasoning import CHANNEL_OPEN as OPEN
from canvaslm.testing import script_engine
from canvaslm.tool_parser import CALL_CLOSE, CALL_OPEN
from canvaslm.tool_parser import QUOTE as Q

httpx = pytest.importorskip("httpx")

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def scripted_llm(monkeypatch, llm, text):
    tok = llm.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_ids[0]]
    monkeypatch.setattr(llm, "_generate_rows", lambda rows, *a, **kw: [
        GenerationResult(r.prompt_ids, list(ids), tok.decode(ids), "stop", 1.0, 1) for r in rows])


def chat(srv, **body):
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": srv.state.model_name, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def test_llm_chat_and_the_server_agree_on_an_open_thought_and_an_unfinished_call(
        chat_specials_dir, opening_template_dir, monkeypatch):
    from canvaslm.server.launch import BackgroundServer, build_state

    cases = [  # (checkpoint, messages, LLM.chat keywords, server body, scripted output)
        (chat_specials_dir, [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": f"{OPEN}thought\nLet me"}],
         dict(continue_final_message=True), dict(add_generation_prompt=False, continue_final_message=True),
         f" think.{CLOSE}It is 4."),
        (opening_template_dir, [{"role": "user", "content": "q"}], dict(chat_template_kwargs={"enable_thinking": True}),
         dict(chat_template_kwargs={"enable_thinking": True}), f"hm{CLOSE}Answer."),
        (opening_template_dir, [{"role": "user", "content": "q"}], dict(chat_template_kwargs={"enable_thinking": True},
                                                             tools=[WEATHER], tool_choice="auto"),
         dict(chat_template_kwargs={"enable_thinking": True}, tools=[WEATHER]),
         f"{CALL_OPEN}call:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}{CLOSE}Sunny."),
        (chat_specials_dir, [{"role": "user", "content": "weather?"}], dict(tools=[WEATHER], tool_choice="auto"),
         dict(tools=[WEATHER]),
         f"{CALL_OPEN}call:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}{CALL_OPEN}call:get_weather{{city:{Q}Ro"),
    ]
    for d, msgs, kw, body, out in cases:
        llm = LLM(d, device="cpu", dtype="float32")
        scripted_llm(monkeypatch, llm, out)
        res = llm.chat(msgs, SamplingParams(max_new_tokens=64), **kw)
        with BackgroundServer(build_state(d, device="cpu")) as srv:
            script_engine(monkeypatch, srv.state, out)
            msg = chat(srv, messages=msgs, **body)
        assert (res.text, res.reasoning) == (msg["content"] or "", msg.get("reasoning_content")), out
        assert [c["function"]["arguments"] for c in res.tool_calls or []] == \
            [c["function"]["arguments"] for c in msg.get("tool_calls") or []]


def test_a_string_template_gets_text_parts_joined_on_both(chat_specials_dir):
    """A template that takes content as a string: the server's prompt and LLM.chat's are the parts joined by "\\n"."""
    from canvaslm.server.launch import BackgroundServer, build_state

    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]}]
    llm = LLM(chat_specials_dir, device="cpu", dtype="float32")
    assert not llm.tokenizer.renders_parts
    want = llm.chat(msgs, SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=0)).prompt_ids
    assert "Hello\nWorld" in llm.tokenizer.decode(want)
    with BackgroundServer(build_state(chat_specials_dir, device="cpu")) as srv:
        r = httpx.post(srv.base_url + "/tokenize", json={"model": srv.state.model_name, "messages": msgs}).json()
    assert r["tokens"] == want


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
PARTS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}{{ m['content'] }}"
                  "{% else %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<model>{% endif %}")


def test_thought_first_goes_on_with_a_thought_the_prompt_opened(opening_template_dir, monkeypatch):
    """Thinking on + a constrained reply, after a generation prompt that ends with `<|channel>thought\\n` (Gemma 4
    after a tool response): the thought request's prompt is the chat prompt as rendered (no second `<|channel>`),
    the answer's is that prompt + the thought and its close; whole and streamed, the thought is the reasoning."""
    import json

    from canvaslm.server.launch import BackgroundServer, build_state

    body = dict(messages=[{"role": "user", "content": "q"}], max_tokens=48,
                chat_template_kwargs={"enable_thinking": True},
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    with BackgroundServer(build_state(opening_template_dir, device="cpu")) as srv:
        tok = srv.state.tokenizer
        want = tok.encode_chat(body["messages"], enable_thinking=True)
        thought = tok.encode(f"hm{CLOSE}", add_special_tokens=False)
        prompts = script_engine(monkeypatch, srv.state, f"hm{CLOSE}", '{"a": 1}')
        msg = chat(srv, **body)
        assert prompts == [want, want + thought]  # the first used to be want + [<|channel>]
        assert (msg["content"], msg["reasoning_content"]) == ('{"a": 1}', "hm")
        prompts = script_engine(monkeypatch, srv.state, f"hm{CLOSE}", '{"a": 1}')
        content, reasoning = "", ""
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=60,
                          json={"model": srv.state.model_name, **body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:])["choices"]:
                        content += ch["delta"].get("content") or ""
                        reasoning += ch["delta"].get("reasoning_content") or ""
        assert prompts == [want, want + thought] and (content, reasoning) == ('{"a": 1}', "hm")


def test_a_template_that_loops_over_parts_gets_text_parts_as_a_list_on_both(chat_specials_dir, tmp_path):
    """A template that renders content parts itself: the server's prompt (/tokenize, a chat reply) and LLM.chat's are
    the parts as the template writes them (transformers and vLLM pass the list), not the parts joined by "\\n"."""
    import shutil

    from canvaslm.server.launch import BackgroundServer, build_state

    d = tmp_path / "parts"
    shutil.copytree(chat_specials_dir, d)
    (d / "chat_template.jinja").write_text(PARTS_TEMPLATE)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]}]
    llm = LLM(d, device="cpu", dtype="float32")
    want = llm.chat(msgs, SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=0)).prompt_ids
    assert llm.tokenizer.decode(want, skip_special_tokens=False) == "<user>[Hello][World]<model>"
    with BackgroundServer(build_state(d, device="cpu")) as srv:
        r = httpx.post(srv.base_url + "/tokenize", json={"model": srv.state.model_name, "messages": msgs}).json()
        assert r["tokens"] == want  # was "<user>Hello\nWorld<model>"
        got = httpx.post(srv.base_url + "/v1/chat/completions", json={
            "model": srv.state.model_name, "messages": msgs, "max_tokens": 4, "logprobs": True}).json()
        assert got["usage"]["prompt_tokens"] == len(want)
        going_on = msgs + [{"role": "assistant", "content": [{"type": "text", "text": "Hi"},
                                                             {"type": "text", "text": "there"}]}]
        r = httpx.post(srv.base_url + "/tokenize", json={
            "model": srv.state.model_name, "messages": going_on, "add_generation_prompt": False,
            "continue_final_message": True}).json()
        assert srv.state.tokenizer.decode(r["tokens"], skip_special_tokens=False) == \
            "<user>[Hello][World]<assistant>[Hi][there"
