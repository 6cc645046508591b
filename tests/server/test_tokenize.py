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


def test_a_byte_token_that_is_not_utf8_alone_is_its_bytes():
    from canvaslm.server.app import token_piece

    class Tok:
        vocab = {0: "<0xE2>", 1: "<0x41>", 2: "\u2581hi"}

        def id_to_token(self, i):
            return self.vocab[i]

        def decode(self, ids, skip_special_tokens=True):
            return {0: "\ufffd", 1: "A", 2: " hi"}[ids[0]]

    assert [token_piece(Tok(), i) for i in range(3)] == [[0xE2], "A", " hi"]
