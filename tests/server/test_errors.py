"""Client mistakes get a 4xx with an OpenAI-style error body naming the field; the server keeps serving.
Also: the API key guards every route but /health, and response_format reaches the constraint builder."""

from __future__ import annotations

import dataclasses
import json
import re

import httpx
import openai
import pytest

from canvaslm.server.launch import BackgroundServer

from .conftest import MAX_MODEL_LEN, MODEL

OK = {"model": MODEL, "prompt": "hello", "max_tokens": 16}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}

BAD = [  # (route, body, expected status, the param the error must name)
    ("completions", {**OK, "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {**OK, "max_tokens": 10**30}, 400, "max_tokens"),
    ("completions", {**OK, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),  # prompt + canvases > context
    ("completions", {**OK, "max_tokens": "16"}, 400, "max_tokens"),
    ("completions", {**OK, "max_tokens": True}, 400, "max_tokens"),
    ("completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("completions", {k: v for k, v in OK.items() if k != "model"}, 400, "model"),
    ("completions", {k: v for k, v in OK.items() if k != "prompt"}, 400, "prompt"),
    ("completions", {**OK, "prompt": "x" * (MAX_MODEL_LEN + 5)}, 400, "prompt"),
    ("completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("completions", {**OK, "prompt": []}, 400, "prompt"),
    ("completions", {**OK, "prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("completions", {**OK, "prompt": "caf\u00e9 \u2603"}, 400, "prompt"),  # not in the char vocabulary
    ("completions", {**OK, "n": 0}, 400, "n"),
    ("completions", {**OK, "n": 1000}, 400, "n"),
    ("completions", {**OK, "temperature": -1}, 400, "temperature"),
    ("completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("completions", {**OK, "seed": -2**63 - 1}, 400, "seed"),  # vLLM's seeds are int64 (a negative one is taken)
    ("completions", {**OK, "seed": 1.5}, 400, "seed"),
    ("completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {**OK, "stop": 7}, 400, "stop"),
    ("completions", {**OK, "stream": "yes"}, 400, "stream"),
    ("completions", {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {**OK, "max_denoising_steps": 0}, 400, "max_denoising_steps"),
    ("completions", {**OK, "max_denoising_steps": 65}, 400, "max_denoising_steps"),  # over the server cap
    ("completions", {**OK, "entropy_bound": -0.1}, 400, "entropy_bound"),
    ("completions", {**OK, "confidence_threshold": 0}, 400, "confidence_threshold"),
    ("completions", {**OK, "sampler": "greedy"}, 400, "sampler"),
    ("completions", {**OK, "stream_drafts": True}, 400, "stream_drafts"),  # needs stream
    ("completions", {**OK, "top_p": 1.5}, 400, "top_p"),
    ("completions", {**OK, "top_k": -2}, 400, "top_k"),
    ("chat/completions", {**CHAT, "min_p": 1.5}, 400, "min_p"),
    ("completions", {**OK, "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("completions", {**OK, "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("completions", {**OK, "logprobs": 21}, 400, "logprobs"),
    ("completions", {**OK, "n": 3, "best_of": 2}, 400, "best_of"),
    ("completions", {**OK, "best_of": 3, "stream": True}, 400, "best_of"),
    ("completions", {**OK, "echo": True, "logprobs": 1, "stream": True}, 400, "stream"),
    ("completions", {**OK, "echo": True, "max_tokens": 0, "stream": True}, 400, "stream"),
    ("completions", {**OK, "logprobs": 1, "suffix": "x"}, 400, "suffix"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("completions", {**OK, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages"),
    ("chat/completions", {**CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": 16, "max_completion_tokens": 32}, 400, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def check_error(resp, status, param):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_gets_openai_error(http, route, body, status, param):
    check_error(http.post(f"/v1/{route}", json=body), status, param)


def test_malformed_bodies_and_routes(http):
    check_error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                400, None)
    check_error(http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}),
                400, None)
    check_error(http.post("/v1/completions", content=b"", headers={"content-type": "application/json"}), 400, None)
    check_error(http.get("/v1/nothing-here"), 404, None)
    check_error(http.get("/v1/models/gpt-4"), 404, "model")
    check_error(http.get("/v1/completions"), 405, None)
    check_error(http.post("/v1/completions", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"}),
                400, None)


@pytest.mark.parametrize("headers", [{"content-type": "application/x-www-form-urlencoded"}, {"content-type": ""},
                                     {"content-type": "text/plain"}])
def test_a_json_body_is_read_whatever_its_content_type(http, headers):
    """`curl -d '{...}'` (form-encoded) and Ollama's / llama-server's examples send no JSON header: the body is
    JSON all the same, as those servers read it."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    r = http.post("/v1/completions", content=body, headers=headers)
    assert r.status_code == 200, r.text
    r = http.post("/tokenize", content=json.dumps({"prompt": "hi"}).encode(), headers=headers)
    assert r.status_code == 200 and r.json()["count"] > 0


def test_server_still_serves_after_bad_input(http):
    for route, body, _, _ in BAD[:5]:
        http.post(f"/v1/{route}", json=body)
    resp = http.post("/v1/completions", json=OK)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_api_key_guards_every_route_but_health(server):
    keyed = dataclasses.replace(server.state, api_key="sekret")
    with BackgroundServer(keyed, shutdown_engine=False) as srv, httpx.Client(base_url=srv.base_url) as c:
        assert c.get("/health").status_code == 200
        for method, path in [("get", "/v1/models"), ("get", "/metrics"), ("get", "/openapi.json"),
                             ("post", "/v1/completions")]:
            resp = getattr(c, method)(path, **({"json": OK} if method == "post" else {}))
            check_error(resp, 401, None)
            assert resp.json()["error"]["code"] == "invalid_api_key"
            wrong = getattr(c, method)(path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        good = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/completions", json=OK, headers=good).status_code == 200


def test_json_schema_response_format(http):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = {**OK, "max_tokens": 32, "response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "t", "schema": schema}}}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    value = json.loads(resp.json()["choices"][0]["text"])
    assert isinstance(value["n"], int)
    bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}}}}
    check_error(http.post("/v1/completions", json=bad), 400, "response_format")


def test_a_slow_constraint_compile_does_not_stall_other_requests(server, monkeypatch):
    """Building a request's constraint (seconds for a JSON schema over a large vocabulary) runs off the
    event loop: /health answers at once while it compiles."""
    import threading
    import time

    from canvaslm.server import serving

    slow, original = 1.5, serving.build_constraint

    def build_slowly(state, body, *rest):
        time.sleep(slow)
        return original(state, body, *rest)
    monkeypatch.setattr(serving, "build_constraint", build_slowly)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault(
        "r", httpx.post(server.base_url + "/v1/completions", json=OK, timeout=60)))
    t.start()
    time.sleep(0.3)  # the request is now compiling its (slow) constraint
    t0 = time.monotonic()
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - t0 < slow / 2
    t.join(60)
    assert done["r"].status_code == 200


def test_a_failing_constraint_fails_its_request_only(server, monkeypatch):
    """An output constraint whose work raises inside the engine (a bug, a limit) gets its request a 500
    naming the failure; requests running beside it, and later ones, are served as usual."""
    import threading

    from canvaslm.sampling.constraints import PinnedConstraint
    from canvaslm.server import serving

    class Broken(PinnedConstraint):
        def canvas(self, k, C, V):
            raise RuntimeError("this constraint is broken")

    original = serving.build_constraint
    monkeypatch.setattr(serving, "build_constraint", lambda state, body, *rest: (
        Broken({0: 5}) if body.prompt == "break me" else original(state, body, *rest)))
    url = server.base_url + "/v1/completions"
    replies = {}
    threads = [threading.Thread(target=lambda key=key, prompt=prompt: replies.setdefault(
        key, httpx.post(url, json={**OK, "prompt": prompt, "seed": 1}, timeout=120)))
        for key, prompt in (("bad", "break me"), ("good", "hello"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    check_error(replies["bad"], 500, None)
    assert "mask for canvas 0 failed" in replies["bad"].json()["error"]["message"]
    assert "this constraint is broken" in replies["bad"].json()["error"]["message"]
    assert replies["good"].status_code == 200, replies["good"].text
    after = httpx.post(url, json={**OK, "seed": 1}, timeout=120)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == replies["good"].json()["choices"][0]["text"]


@pytest.mark.parametrize("route,body,param", [
    ("completions", {**OK, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("completions", {**OK, "prompt": "x" * (MAX_MODEL_LEN - 2)}, "prompt"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]}, "messages"),
    ("completions", {**OK, "prompt": "x" * 40, "suffix": "y" * 40}, "suffix"),
    ("embeddings", {"model": MODEL, "input": "x" * (MAX_MODEL_LEN + 5)}, "input")])
def test_over_the_context_names_its_length_as_clients_parse_it(http, route, body, param):
    """Agent frameworks and OpenAI client wrappers read the context length out of this error (code
    context_length_exceeded, "maximum context length is N tokens") and step down to it."""
    resp = http.post(f"/v1/{route}", json=body)
    check_error(resp, 400, param)
    err = resp.json()["error"]
    assert err["code"] == "context_length_exceeded", err
    assert re.match(rf"This model's maximum context length is {MAX_MODEL_LEN} tokens\b", err["message"]), err


def _parts(*parts) -> dict:
    return {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]}


PICTURE = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize("route,body,message", [
    ("chat/completions", _parts({"type": "image_url", "image_url": {"url": PICTURE, "detail": "original"}}),
     "messages[0].content[1].image_url.detail: Input should be 'auto', 'low' or 'high'"),
    ("chat/completions", _parts({"type": "image_url", "image_url": {}}),
     "messages[0].content[1].image_url.url: Field required"),
    ("chat/completions", _parts({"type": "image_url", "image_url": PICTURE}), "messages[0].content[1].image_url: "),
    ("chat/completions", _parts({"type": "input_audio", "input_audio": {}}),
     "messages[0].content[1]: Input tag 'input_audio' found using 'type' does not match"),
    ("chat/completions", _parts({"type": "text"}), "messages[0].content[1].text: Field required"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]},
     "messages[0].content: Input should be a valid string"),  # no branch fits: the first's error
    ("responses", {"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": PICTURE, "detail": "bogus"}]}]},
     "input[0].content[0].detail: Input should be 'auto', 'low', 'high' or 'original'"),
    ("responses", {"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
     "input[0].arguments: Field required"),
    ("responses", {"model": MODEL, "input": [{"type": "function_call_output", "call_id": "c"}]},
     "input[0].output: Field required"),
])
def test_a_bad_union_member_names_the_part_and_field(http, route, body, message):
    """A union field (content: a string or a list of parts; a Responses input item) gets the error of the branch
    that fits what was sent, not pydantic's first ('messages.0.content.str: Input should be a valid string' for
    every bad image part)."""
    resp = http.post(f"/v1/{route}", json=body)
    check_error(resp, 400, route.split("/")[0] == "chat" and "messages" or "input")
    assert resp.json()["error"]["message"].startswith(message), resp.json()


def test_a_model_served_from_dot_or_under_a_repo_id_can_be_named(tiny_checkpoint, monkeypatch):
    """`canvaslm serve .` serves the directory's name (it served "", which no request can name), and
    GET /v1/models/{id} finds an id holding "/" (a repo id, the default name of a hub model)."""
    from canvaslm.server.launch import BackgroundServer, build_state

    monkeypatch.chdir(tiny_checkpoint)
    assert build_state(".", "cpu", "float32").model_name == tiny_checkpoint.resolve().name
    with BackgroundServer(build_state(tiny_checkpoint, "cpu", "float32", served_model_name="org/tiny")) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        assert client.models.retrieve("org/tiny").id == "org/tiny"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("org/other")


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", CHAT), ("/v1/completions", OK),
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 4})])
def test_tokenising_runs_off_the_event_loop(server, monkeypatch, route, body):
    """A prompt is tokenised in a worker thread (megabytes of text take seconds): /health answers meanwhile."""
    import threading

    from canvaslm.server import app as app_module

    gate, entered = threading.Event(), threading.Event()
    tok = server.state.tokenizer

    def held(original):
        def run(*args, **kwargs):
            entered.set()
            gate.wait(20)
            return original(*args, **kwargs)
        return run
    monkeypatch.setattr(tok, "encode_chat", held(tok.encode_chat))
    monkeypatch.setattr(app_module, "_completion_prompts", held(app_module._completion_prompts))
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", httpx.post(server.base_url + route, json=body,
                                                                        timeout=60)))
    t.start()
    try:
        assert entered.wait(20)
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
    finally:
        gate.set()
        t.join(60)
    assert done["r"].status_code == 200, done["r"].text


def test_http_edges_get_clear_answers(http):
    wrong = http.get("/v1/completions")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]  # RFC 9110
    bad = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\xff\xfe"}',
                    headers={"content-type": "application/json"})
    check_error(bad, 400, None)
    assert "UTF-8" in bad.json()["error"]["message"]
    for route, body, param in [
            ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
             "messages[0].content"),
            ("/v1/responses", '{"model": "tiny", "input": "hi", "max_output_tokens": 2, "metadata": {"k": "\\udfff"}}',
             "metadata.k")]:
        resp = http.post(route, content=body.encode(), headers={"content-type": "application/json"})
        check_error(resp, 400, param)
        assert "surrogate" in resp.json()["error"]["message"]
    paired = '{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}'  # an escaped pair is text: 😀
    resp = http.post("/v1/completions", content=paired.encode(), headers={"content-type": "application/json"})
    assert "surrogate" not in resp.text  # (the tiny char tokenizer may not know the emoji: its own 400)


def test_responses_items_as_openai_types_them(http):
    """function_call_output.output may be a list of parts; a negative seed is taken as on the other routes; an
    unknown item type names the types taken."""
    base = {"model": MODEL, "max_output_tokens": 4}
    items = [{"role": "user", "content": "weather?"},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "sunny"}]}]
    r = http.post("/v1/responses", json={**base, "input": items, "seed": -1})
    assert r.status_code == 200, r.text
    r = http.post("/v1/responses", json={**base, "input": [{"type": "item_reference", "id": "x"}]})
    check_error(r, 400, None)
    message = r.json()["error"]["message"]
    assert "item_reference" in message and "function_call_output" in message, message


def test_bad_words_are_never_written_and_unsupported_vllm_fields_are_refused(http):
    """vLLM's bad_words: one-token words are banned at every position; allowed_token_ids and use_beam_search,
    which this engine cannot honour, are a 400 naming them rather than dropped unseen."""
    base = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 32}
    plain = "".join(http.post("/v1/completions", json={**base, "seed": s}).json()["choices"][0]["text"]
                    for s in range(3))
    common = sorted({ch for ch in plain if ch.strip()}, key=plain.count)[-3:]  # letters the model writes often
    assert common
    text = "".join(http.post("/v1/completions", json={**base, "seed": s, "bad_words": common}).json()
                   ["choices"][0]["text"] for s in range(3))
    assert text and not set(common) & set(text), (common, text)
    for extra, param in [({"bad_words": ["two words"]}, "bad_words"), ({"bad_words": [" "]}, "bad_words"),
                         ({"allowed_token_ids": [5, 6]}, "allowed_token_ids"), ({"use_beam_search": True},
                                                                                  "use_beam_search")]:
        r = http.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_size_limit_is_refused_before_it_is_read(server, http, chunked):
    """--max-request-bytes: a body over the limit gets a 413 naming it, in each API's own error body, whether its
    Content-Length says so or the bytes sent (chunked, no length) pass it; the server keeps serving."""
    limit = server.state.max_request_bytes
    server.state.max_request_bytes = 4096
    try:
        big = json.dumps({**OK, "prompt": "hello " * 2000}).encode()
        assert len(big) > 4096
        for route in ("/v1/completions", "/v1/messages", "/api/generate"):
            content = (c for c in [big[:3000], big[3000:]]) if chunked else big
            resp = http.post(route, content=content, headers={"content-type": "application/json"})
            assert resp.status_code == 413, resp.text
            body = resp.json()
            if route == "/v1/completions":
                assert body["error"]["code"] == "request_too_large"
                message = body["error"]["message"]
            elif route == "/v1/messages":
                assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
                message = body["error"]["message"]
            else:
                message = body["error"]
            assert "4096 bytes" in message and "--max-request-bytes" in message, message
        small = json.dumps(OK).encode()  # under the limit: served, chunked or not
        resp = http.post("/v1/completions", content=(c for c in [small]) if chunked else small,
                         headers={"content-type": "application/json"})
        assert resp.status_code == 200, resp.text
    finally:
        server.state.max_request_bytes = limit
    resp = http.post("/v1/completions", json={**OK, "prompt": "hello " * 10})  # the default limit takes it
    assert resp.status_code == 200, resp.text
