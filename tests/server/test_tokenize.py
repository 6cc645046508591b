"""/tokenize and /detokenize (vLLM's routes): the ids are exactly what the completion routes encode."""

from __future__ import annotations

import httpx
import pytest

from .conftest import MODEL


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def test_tokenize_counts_what_the_completion_routes_encode(http, llm):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "hello there"}).json()
    assert r["tokens"] == llm.tokenizer.encode("hello there") and r["count"] == len(r["tokens"])
    usage = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 4}).json()
    assert usage["usage"]["prompt_tokens"] == r["count"]
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    chat = http.post("/tokenize", json={"messages": msgs, "tools": tools}).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat(msgs, tools=tools)
    plain = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 4}).json()
    assert http.post("/tokenize", json={"messages": msgs}).json()["count"] == plain["usage"]["prompt_tokens"]
    raw = http.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()["tokens"]
    assert raw == llm.tokenizer.encode("hi", add_special_tokens=False)
    text = http.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert text["prompt"] == llm.tokenizer.decode(r["tokens"], skip_special_tokens=False)
    assert text["content"] == text["prompt"]  # llama-server's /detokenize field
    # llama-server's /tokenize body: `content`, BOS only with add_special
    assert http.post("/tokenize", json={"content": "hi"}).json()["tokens"] == raw
    assert http.post("/tokenize", json={"content": "hi", "add_special": True}).json()["tokens"] == \
        llm.tokenizer.encode("hi")


@pytest.mark.parametrize("route,body,status,param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "content": "b"}, 400, "content"),
    ("/tokenize", {"prompt": "a", "add_special": True}, 400, "add_special"),  # named, not `content`
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_bad_tokenize_requests_name_the_field(http, route, body, status, param):
    resp = http.post(route, json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


def test_tokenize_returns_token_strings_when_asked(http, llm):
    r = http.post("/tokenize", json={"prompt": "hi there", "return_token_strs": True}).json()
    assert r["token_strs"] == [llm.tokenizer.id_to_token(i) for i in r["tokens"]] and len(r["token_strs"]) == r["count"]
    assert "token_strs" not in http.post("/tokenize", json={"prompt": "hi there"}).json()


def test_tokenize_with_pieces_gives_llama_server_s_id_piece_pairs(http, llm):
    r = http.post("/tokenize", json={"content": "hi there", "with_pieces": True}).json()
    ids = llm.tokenizer.encode("hi there", add_special_tokens=False)
    assert [t["id"] for t in r["tokens"]] == ids and r["count"] == len(ids)
    assert "".join(t["piece"] for t in r["tokens"]) == "hi there"
    assert http.post("/tokenize", json={"content": "hi there"}).json()["tokens"] == ids


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory, one_thread):
    """The tiny checkpoint with Gemma's byte tokens: characters outside its vocabulary (€) are spelt in bytes."""
    from canvaslm.server.launch import BackgroundServer, build_state
    from canvaslm.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(tmp_path_factory.mktemp("bytes"), byte_fallback=True)
    with BackgroundServer(build_state(d, device="cpu", served_model_name=MODEL)) as srv:
        yield srv


def test_a_byte_token_that_is_not_utf8_alone_is_its_bytes(byte_server):
    r = httpx.post(byte_server.base_url + "/tokenize", json={"content": "a €A", "with_pieces": True}).json()
    assert [t["piece"] for t in r["tokens"]] == ["a", " ", [0xE2], [0x82], [0xAC], "A"]


def test_chat_logprobs_bytes_are_each_tokens_own_bytes(byte_server, monkeypatch):
    """OpenAI's `bytes` exist so that tokens holding part of a character join back into it: a byte token gives
    its byte, not the UTF-8 of the replacement character its text decodes to alone."""
    from canvaslm.testing import script_engine

    script_engine(monkeypatch, byte_server.state, "a €")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}
    r = httpx.post(byte_server.base_url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    entries = r["logprobs"]["content"]
    assert [e["bytes"] for e in entries] == [[97], [32], [0xE2], [0x82], [0xAC]]
    assert [e["token"] for e in entries][2:] == ["\ufffd"] * 3 and r["message"]["content"] == "a €"
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8") == r["message"]["content"]
    tops = [t for e in entries for t in e["top_logprobs"]]
    assert all(len(t["bytes"]) == 1 if t["token"] == "\ufffd" else bytes(t["bytes"]) == t["token"].encode()
               for t in tops)
