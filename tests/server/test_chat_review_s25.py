"""Chat review (session 25), server side: LLM.chat and the server agree on a reply that goes on with a thought the
prompt left open and on an unfinished call read by tool_choice="auto", and render text parts alike for a template
that takes content as a string. A random model writes no channel, so the engine is scripted (the real run_choices
reads its commits), as in tests/sampling/test_reasoning.py."""

from __future__ import annotations

import pytest

from canvaslm.llm import LLM, GenerationResult, SamplingParams
from canvaslm.reasoning import CHANNEL_CLOSE as CLOSE
from canvaslm.reasoning import CHANNEL_OPEN as OPEN
from canvaslm.tool_parser import CALL_CLOSE, CALL_OPEN
from canvaslm.tool_parser import QUOTE as Q

httpx = pytest.importorskip("httpx")

OPENING_TEMPLATE = (  # Gemma 4's shape: with thinking on, the generation prompt opens the thought channel
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% if enable_thinking %}<|channel>thought\n{% endif %}{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory):
    from canvaslm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("think_s25"), extra_specials=(
        OPEN, CLOSE, CALL_OPEN, CALL_CLOSE, Q, "<|tool_response>"))


@pytest.fixture(scope="module")
def opening_dir(tmp_path_factory, think_dir):
    import shutil

    d = tmp_path_factory.mktemp("opening_s25") / "ckpt"
    shutil.copytree(think_dir, d)
    (d / "chat_template.jinja").write_text(OPENING_TEMPLATE)
    return d


def script(monkeypatch, state, *texts):
    """The engine answers its k-th request with texts[k]'s ids (the last text for later ones), then EOS unless the
    text ends with `<channel|>` (a thought request ends there); returns the list the requests' prompts go to."""
    from canvaslm.engine.engine import Commit, Finish

    tok, prompts = state.tokenizer, []

    def submit(request, queue, loop):
        text = texts[min(len(prompts), len(texts) - 1)]
        prompts.append(list(request.prompt_ids))
        ids = tok.encode(text, add_special_tokens=False) + ([] if text.endswith(CLOSE) else [tok.eos_ids[0]])
        loop.call_soon_threadsafe(queue.put_nowait, Commit(request.request_id, 0, tuple(ids)))
        loop.call_soon_threadsafe(queue.put_nowait, Finish(request.request_id, "stop", len(ids), 1))

    monkeypatch.setattr(state.engine, "submit", submit)
    return prompts


def scripted_llm(monkeypatch, llm, text):
    tok = llm.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_ids[0]]
    monkeypatch.setattr(llm, "_generate_rows", lambda rows, *a, **kw: [
        GenerationResult(r.prompt_ids, list(ids), tok.decode(ids), "stop", 1.0, 1) for r in rows])


def chat(srv, **body):
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": srv.state.model_name, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def test_llm_chat_and_the_server_agree_on_an_open_thought_and_an_unfinished_call(think_dir, opening_dir, monkeypatch):
    from canvaslm.server.launch import BackgroundServer, build_state

    cases = [  # (checkpoint, messages, LLM.chat keywords, server body, scripted output)
        (think_dir, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": f"{OPEN}thought\nLet me"}],
         dict(continue_final_message=True), dict(add_generation_prompt=False, continue_final_message=True),
         f" think.{CLOSE}It is 4."),
        (opening_dir, [{"role": "user", "content": "q"}], dict(chat_template_kwargs={"enable_thinking": True}),
         dict(chat_template_kwargs={"enable_thinking": True}), f"hm{CLOSE}Answer."),
        (opening_dir, [{"role": "user", "content": "q"}], dict(chat_template_kwargs={"enable_thinking": True},
                                                             tools=[WEATHER], tool_choice="auto"),
         dict(chat_template_kwargs={"enable_thinking": True}, tools=[WEATHER]),
         f"{CALL_OPEN}call:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}{CLOSE}Sunny."),
        (think_dir, [{"role": "user", "content": "weather?"}], dict(tools=[WEATHER], tool_choice="auto"),
         dict(tools=[WEATHER]),
         f"{CALL_OPEN}call:get_weather{{city:{Q}Oslo{Q}}}{CALL_CLOSE}{CALL_OPEN}call:get_weather{{city:{Q}Ro"),
    ]
    for d, msgs, kw, body, out in cases:
        llm = LLM(d, device="cpu", dtype="float32")
        scripted_llm(monkeypatch, llm, out)
        res = llm.chat(msgs, SamplingParams(max_new_tokens=64), **kw)
        with BackgroundServer(build_state(d, device="cpu")) as srv:
            script(monkeypatch, srv.state, out)
            msg = chat(srv, messages=msgs, **body)
        assert (res.text, res.reasoning) == (msg["content"] or "", msg.get("reasoning_content")), out
        assert [c["function"]["arguments"] for c in res.tool_calls or []] == \
            [c["function"]["arguments"] for c in msg.get("tool_calls") or []]


def test_a_string_template_gets_text_parts_joined_on_both(think_dir):
    """A template that takes content as a string: the server's prompt and LLM.chat's are the parts joined by "\\n"."""
    from canvaslm.server.launch import BackgroundServer, build_state

    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]}]
    llm = LLM(think_dir, device="cpu", dtype="float32")
    assert not llm.tokenizer.renders_parts
    want = llm.chat(msgs, SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=0)).prompt_ids
    assert "Hello\nWorld" in llm.tokenizer.decode(want)
    with BackgroundServer(build_state(think_dir, device="cpu")) as srv:
        r = httpx.post(srv.base_url + "/tokenize", json={"model": srv.state.model_name, "messages": msgs}).json()
    assert r["tokens"] == want
