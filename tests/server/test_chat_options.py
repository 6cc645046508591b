"""vLLM's chat options: `continue_final_message` (the model goes on with a prefilled assistant reply),
`add_generation_prompt`, and `chat_template_kwargs` (more template variables), over the openai client
and in `LLM.chat`."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

from canvaslm.llm import LLM, SamplingParams
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.testing import CHAT_TEMPLATE

THINKING = "{% if enable_thinking %}THINK{% endif %}" + CHAT_TEMPLATE
PREFILLED = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "The fruit is"}]
PREFILL = {"add_generation_prompt": False, "continue_final_message": True}


@pytest.fixture(scope="module")
def client(tiny_checkpoint, one_thread):
    state = build_state(tiny_checkpoint, "cpu", "float32", served_model_name="tiny")
    state.tokenizer.set_chat_template(THINKING, "test template")
    with BackgroundServer(state) as srv:
        yield OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60), state.tokenizer


def test_continue_final_message_prompt_ends_inside_the_reply(client):
    c, tok = client
    r = c.chat.completions.create(model="tiny", messages=PREFILLED, max_tokens=8, seed=1, extra_body=PREFILL)
    want = tok.encode_chat(PREFILLED, False, continue_final_message=True)
    assert r.usage.prompt_tokens == len(want)
    assert tok.decode(want).endswith("The fruit is")  # no end of turn, no new model turn
    closed = c.chat.completions.create(model="tiny", messages=PREFILLED, max_tokens=8, seed=1,
                                       extra_body={"add_generation_prompt": False})
    assert closed.usage.prompt_tokens == len(tok.encode_chat(PREFILLED, False)) > r.usage.prompt_tokens
    # a final message of any role goes on (transformers 5): the prompt ends inside the user's message
    user = c.chat.completions.create(model="tiny", messages=PREFILLED[:1], max_tokens=4, seed=1, extra_body=PREFILL)
    ids = tok.encode_chat(PREFILLED[:1], False, continue_final_message=True)
    assert user.usage.prompt_tokens == len(ids) and tok.decode(ids).endswith(PREFILLED[0]["content"])


@pytest.mark.parametrize("messages,extra,words", [
    (PREFILLED, {"continue_final_message": True}, "cannot be combined with add_generation_prompt"),
])
def test_continue_final_message_refusals(client, messages, extra, words):
    c, _ = client
    with pytest.raises(BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == "continue_final_message" and words in e.value.body["message"]


def test_chat_template_kwargs_reach_the_template(client):
    c, _ = client
    msgs = [{"role": "user", "content": "hi"}]
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, seed=1)
    thinking = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, seed=1,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert thinking.usage.prompt_tokens == plain.usage.prompt_tokens + len("THINK")
    with pytest.raises(BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                  extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert e.value.body["param"] == "chat_template_kwargs"


def test_llm_chat_continues_the_final_message(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    out = llm.chat(PREFILLED, SamplingParams(seed=3, max_new_tokens=8), continue_final_message=True)
    assert out.prompt_ids == llm.tokenizer.encode_chat(PREFILLED, False, continue_final_message=True)
    user = llm.chat(PREFILLED[:1], SamplingParams(seed=3, max_new_tokens=4), continue_final_message=True)
    assert llm.tokenizer.decode(user.prompt_ids).endswith(PREFILLED[0]["content"])  # any role goes on


def test_tokenize_takes_the_same_options(client):
    import httpx

    c, tok = client
    base = str(c.base_url).rstrip("/").removesuffix("/v1")
    r = httpx.post(base + "/tokenize", json={"messages": PREFILLED, **PREFILL,
                                             "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert r["tokens"] == tok.encode_chat(PREFILLED, False, continue_final_message=True, enable_thinking=True)


def test_stop_string_kept_with_include_stop_str_in_output(client):
    c, _ = client
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=24, seed=5)
    plain = c.completions.create(**kw).choices[0].text
    stop = plain[6:8]
    at = plain.find(stop)
    cut = c.completions.create(**kw, stop=[stop]).choices[0]
    kept = c.completions.create(**kw, stop=[stop], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert cut.text == plain[:at] and kept.text == plain[:at + len(stop)]
    assert cut.finish_reason == kept.finish_reason == "stop"


def test_special_tokens_shown_when_asked(client):
    c, tok = client
    bos = tok.bos_id
    kw = dict(model="tiny", prompt="abc", max_tokens=3, seed=1, logit_bias={str(bos): 100})
    assert c.completions.create(**kw).choices[0].text == ""
    shown = c.completions.create(**kw, extra_body={"skip_special_tokens": False}).choices[0].text
    assert shown == tok.decode([bos] * 3, skip_special_tokens=False) and shown


def test_truncate_prompt_tokens_keeps_the_last_tokens(client):
    c, tok = client
    prompt = "a long prompt that goes on and on"
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, seed=2,
                             extra_body={"truncate_prompt_tokens": 10})
    want = c.completions.create(model="tiny", prompt=tok.encode(prompt)[-10:], max_tokens=4, seed=2)
    assert r.usage.prompt_tokens == 10 and r.choices[0].text == want.choices[0].text
