"""/v1/completions with `logprobs` (server/scored.py): the text is the one the same request gets without
logprobs (stop strings, skip_special_tokens), and each top_logprobs entry holds the token taken there."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from canvaslm.engine.engine import EngineConfig
from canvaslm.server.app import build_app
from canvaslm.server.launch import build_state

START_OF_TURN = 3  # the tiny checkpoint's <start_of_turn>, a special token


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory, one_thread):
    """The tiny checkpoint with its 'Z' turned into one token 'xy', so a stop string 'y' cuts a token in two."""
    ck = tmp_path_factory.mktemp("xy") / "model"
    shutil.copytree(tiny_checkpoint, ck)
    tok = json.loads((ck / "tokenizer.json").read_text())
    xy = tok["model"]["vocab"].pop("Z")
    tok["model"]["vocab"]["xy"] = xy
    tok["added_tokens"].append({"id": xy, "content": "xy", "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": False})
    (ck / "tokenizer.json").write_text(json.dumps(tok))
    state = build_state(ck, "cpu", "float32", EngineConfig(max_batch=4, max_model_len=80, prefill_chunk=64),
                        served_model_name="tiny", max_denoising_steps=64)
    assert state.tokenizer.encode("xy") == [xy]
    try:
        yield TestClient(build_app(state)), xy
    finally:
        state.shutdown()


def _choice(c, **body):
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "seed": 1, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_logprobs_leave_the_text_as_without_them(client):
    c, xy = client
    stop = {"max_tokens": 4, "logit_bias": {str(xy): 100}, "stop": ["y"]}  # 'xy' taken, cut to 'x'
    plain = _choice(c, **stop)
    assert plain["text"] == "x" and plain["finish_reason"] == "stop"
    scored = _choice(c, **stop, logprobs=1)
    assert scored["text"] == "x" and scored["logprobs"]["tokens"] == ["xy"]  # the token the text shows part of
    echoed = _choice(c, **stop, logprobs=1, echo=True)
    assert echoed["text"] == "abx" and echoed["logprobs"]["tokens"][-1] == "xy"
    assert _choice(c, **stop, echo=True)["text"] == "abx"
    special = {"max_tokens": 3, "logit_bias": {str(START_OF_TURN): 100}, "skip_special_tokens": False}
    plain = _choice(c, **special)
    assert plain["text"] == "<start_of_turn>" * 3
    scored = _choice(c, **special, logprobs=0)
    assert scored["text"] == plain["text"]
    _offsets_hold_the_tokens(scored)


def test_top_logprobs_hold_the_token_taken(client):
    """As OpenAI (up to logprobs + 1 entries) and vLLM (the sampled token always) give them."""
    c, _ = client
    for k in (0, 1, 3):
        lp = _choice(c, max_tokens=3, temperature=0, logprobs=k)["logprobs"]
        assert len(lp["top_logprobs"]) == len(lp["tokens"]) == 3
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert top[token] == logprob and 1 <= len(top) <= k + 1
        if k == 0:
            assert all(len(top) == 1 for top in lp["top_logprobs"])
    lp = _choice(c, max_tokens=0, echo=True, logprobs=0)["logprobs"]
    assert lp["top_logprobs"][0] is None
    assert [list(top) for top in lp["top_logprobs"][1:]] == [[t] for t in lp["tokens"][1:]]


def _events(c, **body):
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "seed": 1, "stream": True, **body})
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_streamed_logprobs_and_usage_equal_the_whole_replys(client):
    """Streamed completions with logprobs and skip_special_tokens false give the same text_offset as the whole reply
    (special tokens' text counted); scored and infill replies carry the usage every other reply has."""
    c, _ = client
    body = {"max_tokens": 17, "logprobs": 0, "skip_special_tokens": False,
            "logit_bias": {str(START_OF_TURN): 8}}  # special tokens in the text
    whole = _choice(c, **body)
    assert "<start_of_turn>" in whole["text"]
    events = _events(c, **body, stream_options={"include_usage": True})
    offsets = [o for e in events if e["choices"] and e["choices"][0]["logprobs"]
               for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]
    streamed_usage = events[-1]["usage"]
    for extra in ({"logprobs": 1}, {"logprobs": 1, "echo": True}, {"suffix": "yz", "max_tokens": 8}):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "seed": 1, "max_tokens": 17, **extra})
        assert set(r.json()["usage"]) >= set(streamed_usage) - {"completion_tokens_details"}, r.json()["usage"]
    lines = _events(c, suffix="yz", max_tokens=8, stream_options={"include_usage": True,
                                                                  "continuous_usage_stats": True})
    assert all(e.get("usage") for e in lines), lines


def test_a_streamed_echo_is_the_prompt_as_sent(client):
    """The streamed echo is the whole reply's: a text prompt as sent, special tokens included (it dropped them)."""
    c, _ = client
    prompt = "<start_of_turn>user\nhi<end_of_turn>\n"
    for extra in ({}, {"skip_special_tokens": False}):
        whole = _choice(c, prompt=prompt, max_tokens=2, echo=True, **extra)["text"]
        events = _events(c, prompt=prompt, max_tokens=2, echo=True, **extra)
        assert whole.startswith(prompt) and "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole
    ids = [START_OF_TURN, 40, 41]
    for skip in (True, False):
        whole = _choice(c, prompt=ids, max_tokens=2, echo=True, skip_special_tokens=skip)["text"]
        events = _events(c, prompt=ids, max_tokens=2, echo=True, skip_special_tokens=skip)
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole


def _offsets_hold_the_tokens(choice):
    """Each token listed starts at its text_offset in the returned text."""
    lp = choice["logprobs"]
    assert all(choice["text"][o:].startswith(t) for t, o in zip(lp["tokens"], lp["text_offset"])), lp


def test_echo_returns_the_prompt_as_sent(client):
    """A text prompt is echoed as it was sent, its special tokens included (OpenAI's and vLLM's echo), whatever
    skip_special_tokens says of the completion; a token-id prompt is decoded with skip_special_tokens. text_offset
    points into the text returned."""
    c, _ = client
    prompt = "<start_of_turn>user\nhi<end_of_turn>\n"
    for extra in ({}, {"skip_special_tokens": False}, {"logprobs": 0}, {"logprobs": 1, "skip_special_tokens": False}):
        ch = _choice(c, prompt=prompt, max_tokens=0, echo=True, **extra)
        assert ch["text"] == prompt, extra
        if "logprobs" in extra:
            assert ch["logprobs"]["tokens"][0] == "<start_of_turn>"
            _offsets_hold_the_tokens(ch)
    generated = _choice(c, prompt=prompt, max_tokens=2, echo=True, logprobs=0)
    assert generated["text"].startswith(prompt) and generated["logprobs"]["text_offset"][10] == len(prompt)
    ids = [START_OF_TURN, 40, 41]
    plain = _choice(c, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    kept = _choice(c, prompt=ids, max_tokens=0, echo=True, logprobs=0, skip_special_tokens=False)
    assert kept["text"] == "<start_of_turn>" + plain["text"] and not plain["text"].startswith("<")
    assert plain["logprobs"]["text_offset"] == [0, 0, 1] and kept["logprobs"]["text_offset"] == [0, 15, 16]
    _offsets_hold_the_tokens(kept)
