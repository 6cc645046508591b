"""Ollama's API (server/ollama.py), driven by the official `ollama` client: each request must mean exactly
what its OpenAI translation means on this server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

ollama = pytest.importorskip("ollama")

from canvaslm.server.ollama import ollama_message  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(translated_api_server):
    return translated_api_server


def clients(server):
    return (ollama.Client(host=server.base_url),
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0))


def test_chat_equals_the_chat_completion_streamed_or_not(server):
    o, oa = clients(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    opts = {"seed": 3, "num_predict": 40, "temperature": 0.6, "top_k": 30, "repeat_penalty": 1.2}
    ref = oa.chat.completions.create(model=MODEL, messages=messages, seed=3, max_tokens=40, temperature=0.6,
                                     extra_body={"top_k": 30, "repetition_penalty": 1.2})
    whole = o.chat(model=f"{MODEL}:latest", messages=messages, options=opts, stream=False)
    assert whole.message.role == "assistant" and whole.message.content == ref.choices[0].message.content
    assert whole.done and whole.done_reason == {"stop": "stop", "length": "length"}[ref.choices[0].finish_reason]
    assert whole.eval_count == ref.usage.completion_tokens
    assert whole.prompt_eval_count <= ref.usage.prompt_tokens and whole.total_duration > 0
    assert o.chat(model=MODEL, messages=messages, options={**opts, "top_k": -1}).message.content == \
        oa.chat.completions.create(model=MODEL, messages=messages, seed=3, max_tokens=40, temperature=0.6,
                                   extra_body={"repetition_penalty": 1.2}).choices[0].message.content  # -1: all
    parts = list(o.chat(model=MODEL, messages=messages, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]


def test_generate_templated_raw_and_insert(server, tiny_checkpoint):
    o, oa = clients(server)
    opts = {"seed": 1, "num_predict": 30}
    templated = o.generate(model=MODEL, prompt="hi", system="sys", options=opts)
    ref = oa.chat.completions.create(model=MODEL, seed=1, max_tokens=30, messages=[
        {"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}])
    assert templated.response == ref.choices[0].message.content
    no_suffix = o.generate(model=MODEL, prompt="hi", system="sys", suffix="", options=opts)  # "" is no suffix
    assert no_suffix.response == templated.response
    raw = o.generate(model=MODEL, prompt="def f(x):", raw=True, options=opts)
    assert raw.response == oa.completions.create(model=MODEL, prompt="def f(x):", seed=1, max_tokens=30).choices[0].text
    streamed = list(o.generate(model=MODEL, prompt="def f(x):", raw=True, options=opts, stream=True))
    assert "".join(p.response for p in streamed) == raw.response and streamed[-1].done
    ins = o.generate(model=MODEL, prompt="x = ", suffix=" + 1", options={"seed": 2, "num_predict": 8})
    ref = oa.completions.create(model=MODEL, prompt="x = ", suffix=" + 1", seed=2, max_tokens=8)
    assert ins.response == ref.choices[0].text and ins.eval_count == ref.usage.completion_tokens
    # a middle that takes the whole num_predict ends by its limit, as the /v1 route's (a random model may write it)
    assert ins.done_reason == ref.choices[0].finish_reason == ("length" if ins.eval_count == 8 else "stop")
    cut = o.generate(model=MODEL, prompt="def f(x):", raw=True, options={**opts, "stop": [raw.response[5:7]]})
    assert cut.response == raw.response[:raw.response.find(raw.response[5:7])]
    if len(ins.response) > 1:  # insert mode cuts at a stop string too, and counts only the ids up to it
        word = ins.response[1]  # (the one that completes it included, as vLLM counts; one character a token here)
        cut = o.generate(model=MODEL, prompt="x = ", suffix=" + 1", options={"seed": 2, "num_predict": 8, "stop": [word]})
        at = ins.response.find(word)
        assert cut.response == ins.response[:at] and cut.eval_count == at + 1 <= ins.eval_count


def test_a_final_assistant_message_is_continued(server):
    """As Ollama does: the reply goes on from a final assistant message (a prefill), not a new turn."""
    o, oa = clients(server)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}]
    got = o.chat(model=MODEL, messages=msgs, options={"seed": 1, "num_predict": 8})
    ref = oa.chat.completions.create(model=MODEL, max_tokens=8, seed=1, messages=msgs,
                                     extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert got.message.content == ref.choices[0].message.content
    assert got.prompt_eval_count <= ref.usage.prompt_tokens
    opened = oa.chat.completions.create(model=MODEL, max_tokens=8, seed=1, messages=msgs)
    assert opened.usage.prompt_tokens > ref.usage.prompt_tokens  # a new turn would have been longer


def test_generate_context_goes_on_from_the_earlier_reply(server, tiny_checkpoint):
    """Ollama's deprecated `context`: a templated reply carries the prompt's and the reply's ids, and a
    request that sends them back is that conversation followed by the new templated prompt."""
    from canvaslm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_checkpoint)
    o, oa = clients(server)
    opts = {"seed": 1, "num_predict": 20}
    first = o.generate(model=MODEL, prompt="hi", options=opts)
    prompt = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert first.context[:len(prompt)] == prompt
    assert tok.decode(first.context[len(prompt):]) == first.response and first.eval_count == len(first.context) - len(prompt)
    second = o.generate(model=MODEL, prompt="and then?", context=first.context, options={"seed": 2, "num_predict": 20})
    turn = tok.encode_chat([{"role": "user", "content": "and then?"}])
    ids = first.context + (turn[1:] if turn[:1] == [tok.bos_id] else turn)
    ref = oa.completions.create(model=MODEL, prompt=ids, seed=2, max_tokens=20)
    assert second.response == ref.choices[0].text and second.context[:len(ids)] == ids
    raw = o.generate(model=MODEL, prompt="x", raw=True, options=opts)
    assert not raw.context  # as Ollama: no context for a raw prompt
    bad = httpx.post(server.base_url + "/api/generate", json={"model": MODEL, "prompt": "x", "context": [10**9],
                                                              "stream": False})
    assert bad.status_code == 400 and "error" in bad.json()


def test_format_json_schema_always_parses(server):
    import jsonschema

    o, _ = clients(server)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = o.chat(model=MODEL, messages=[{"role": "user", "content": "json"}], format=schema,
               options={"seed": 0, "num_predict": 40})
    jsonschema.validate(json.loads(r.message.content), schema)
    r = o.generate(model=MODEL, prompt="json", format="json", options={"seed": 0, "num_predict": 40})
    assert isinstance(json.loads(r.response), dict)


def test_models_show_version_and_embeddings(server):
    o, oa = clients(server)
    names = [m.model for m in o.list().models]
    assert names == [f"{MODEL}:latest"]
    info = o.show(MODEL)
    assert "completion" in info.capabilities and info.modelinfo["diffusion_gemma.context_length"] == 512
    assert "thinking" not in info.capabilities  # no thought channel tokens in this vocabulary
    assert "vision" not in info.capabilities  # a vision config, but no vision tower weights
    assert httpx.get(server.base_url + "/api/version").json()["version"]
    assert [m.model for m in o.ps().models] == names
    emb = o.embed(model=MODEL, input=["hello", "world"])
    ref = oa.embeddings.create(model=MODEL, input=["hello", "world"])
    assert len(emb.embeddings) == 2
    for got, want in zip(emb.embeddings, ref.data):
        assert list(map(float, got)) == pytest.approx(want.embedding)
    long = "the quick brown fox " * 40  # over the context: Ollama cuts its end unless truncate is false
    ids = httpx.post(server.base_url + "/tokenize", json={"model": MODEL, "prompt": long}).json()["tokens"]
    limit = server.state.max_model_len
    assert len(ids) > limit
    cut = oa.embeddings.create(model=MODEL, input=[ids[:limit]]).data[0].embedding
    assert list(map(float, o.embed(model=MODEL, input=long).embeddings[0])) == pytest.approx(cut)
    r = httpx.post(server.base_url + "/api/embed", json={"model": MODEL, "input": long, "truncate": False})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]
    legacy = httpx.post(server.base_url + "/api/embeddings", json={"model": MODEL, "prompt": "hello"}).json()
    assert legacy["embedding"] == pytest.approx(ref.data[0].embedding)


def test_tool_calls_come_back_as_ollama_writes_them():
    msg = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert ollama_message(msg) == {"role": "assistant", "content": "",
                                   "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}


@pytest.mark.parametrize("route,body,status,needle", [
    ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model 'nope' not found"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["AA=="]}]}, 400,
     "cannot read images"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "think": True}, 400,
     "think needs the chat template"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, 400,
     "tiny does not support tools"),
    ("/api/show", {}, 400, "model is required"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": "yaml"}, 400, "expected \"json\""),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                   "options": {"num_predict": 5000}}, 400, "num_predict=5000 is over it"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "format": {
        "type": "object", "properties": {"a": {"type": "string"}}}, "options": {"num_predict": 3}}, 400,
     "format: json_schema: the output template is over num_predict=3"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": "get_weather"}]}, {"role": "user", "content": "x"}]}, 400, "tool_calls[0]: a call needs function.name"),
])
def test_errors_are_ollamas_body(server, route, body, status, needle):
    r = httpx.post(server.base_url + route, json={"stream": False, **body}, timeout=60)
    assert r.status_code == status and set(r.json()) == {"error"} and needle in r.json()["error"], r.text


def test_an_empty_request_loads_and_answers_at_once(server):
    r = httpx.post(server.base_url + "/api/generate", json={"model": MODEL}).json()
    assert r["done"] and r["done_reason"] == "load"
