"""The translated APIs where they answered otherwise than the API they speak: Anthropic's stop_reason for a reply
cut by max_tokens after a complete call (it said tool_use) and where that reply's unfinished call went (before
the tool_use block), llama-server's `tokens` / `tokens_predicted` under an n_indent cut (the whole reply's, and
generation ran on past the cut), and Ollama's done_reason for an empty request with keep_alive 0 ("load")."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from canvaslm.engine.engine import Commit, EngineConfig, Finish
from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
from canvaslm.server.launch import BackgroundServer, build_state
from canvaslm.tool_parser import CALL_CLOSE, CALL_OPEN, QUOTE

MODEL = "tiny"
ASK = [{"role": "user", "content": "weather?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"name": "get_weather", "input_schema": SCHEMA}
CALL = f"{CALL_OPEN}call:get_weather{{city:{QUOTE}Oslo{QUOTE}}}{CALL_CLOSE}"
PART = f"{CALL_OPEN}call:get_weather{{city:{QUOTE}Ber"  # a second call, cut off


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A checkpoint with tool-call and thought-channel tokens (its engine is scripted per test)."""
    from canvaslm.testing import make_tiny_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ck = make_tiny_checkpoint(tmp_path_factory.mktemp("native"), extra_specials=(
        CALL_OPEN, CALL_CLOSE, QUOTE, "<|tool_response>", CHANNEL_OPEN, CHANNEL_CLOSE))
    state = build_state(ck, "cpu", "float32", EngineConfig(max_batch=2, max_model_len=512), served_model_name=MODEL)
    with BackgroundServer(state) as srv:
        yield srv
    torch.set_num_threads(threads)


def script(monkeypatch, state, text: str, reason: str = "stop", every: int = 4) -> list:
    """state.engine commits `text` (and EOS when it ends with "stop"), `every` tokens a canvas, then finishes with
    `reason`; the returned list gets each (request id, reason) state.engine.cancel is called with."""
    tok = state.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + ([tok.eos_ids[0]] if reason == "stop" else [])
    cancels = []

    def submit(request, queue, loop, *rest):
        for k, a in enumerate(range(0, len(ids), every)):
            loop.call_soon_threadsafe(queue.put_nowait, Commit(request.request_id, k, tuple(ids[a:a + every])))
        loop.call_soon_threadsafe(queue.put_nowait, Finish(request.request_id, reason, len(ids), 1))

    monkeypatch.setattr(state.engine, "submit", submit)
    monkeypatch.setattr(state.engine, "cancel", lambda rid, why="cancelled": cancels.append((rid, why)))
    return cancels


def events(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def streamed_blocks(r: httpx.Response) -> tuple[list[dict], str]:
    """The content blocks and stop_reason an Anthropic event stream adds up to."""
    blocks, reason = [], None
    for e in events(r):
        if e["type"] == "content_block_start":
            blocks.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            d, b = e["delta"], blocks[e["index"]]
            if d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "input_json_delta":
                b["input"] = json.loads(d["partial_json"])
        elif e["type"] == "message_delta":
            reason = e["delta"]["stop_reason"]
    return [{k: v for k, v in b.items() if k != "id"} for b in blocks], reason


# --- Anthropic: max_tokens wins over tool_use --------------------------------------------------------------------

def messages(server, monkeypatch, text: str, reason: str) -> tuple[list, str, list, str]:
    """(whole blocks, whole stop_reason, streamed blocks, streamed stop_reason) of a scripted reply."""
    body = {"model": MODEL, "max_tokens": 200, "messages": ASK, "tools": [WEATHER]}
    script(monkeypatch, server.state, text, reason)
    whole = httpx.post(server.base_url + "/v1/messages", json=body, timeout=120).json()
    script(monkeypatch, server.state, text, reason)
    blocks, stop = streamed_blocks(httpx.post(server.base_url + "/v1/messages", json={**body, "stream": True},
                                              timeout=120))
    return [{k: v for k, v in b.items() if k != "id"} for b in whole["content"]], whole["stop_reason"], blocks, stop


def test_a_reply_cut_after_a_complete_call_says_max_tokens(server, monkeypatch):
    """A complete call, then max_tokens inside a second one: stop_reason max_tokens (as Anthropic's, and as the chat
    route's finish_reason "length"), whole and streamed; the unfinished call's text, which the chat route keeps in
    its content, is a text block after the tool_use block, where the model wrote it."""
    whole, reason, streamed, stream_reason = messages(server, monkeypatch, "Let me check." + CALL + PART, "length")
    assert reason == stream_reason == "max_tokens"
    cut = server.state.tokenizer.decode(server.state.tokenizer.encode(PART, add_special_tokens=False),
                                        skip_special_tokens=False)
    assert whole == streamed == [{"type": "text", "text": "Let me check."},
                                 {"type": "tool_use", "name": "get_weather", "input": {"city": "Oslo"}},
                                 {"type": "text", "text": cut}]
    script(monkeypatch, server.state, "Let me check." + CALL + PART, "length")
    chat = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": ASK, "tools": [{"type": "function", "function": {
            "name": "get_weather", "parameters": SCHEMA}}]}).json()["choices"][0]
    assert chat["finish_reason"] == "length" and chat["message"]["content"] == "Let me check." + cut


def test_a_complete_call_at_eos_still_says_tool_use(server, monkeypatch):
    whole, reason, streamed, stream_reason = messages(server, monkeypatch, "Let me check." + CALL, "stop")
    assert reason == stream_reason == "tool_use"
    assert whole == streamed == [{"type": "text", "text": "Let me check."},
                                 {"type": "tool_use", "name": "get_weather", "input": {"city": "Oslo"}}]


# --- llama-server /completion: n_indent ends the reply as a stop string does ---------------------------------------

REPLY = "x = 1\n    y = 2\n  z = 3\nw = 4\n    v = 5 STOP more"


@pytest.mark.parametrize("stream", [False, True])
def test_n_indent_cut_keeps_the_ids_of_the_kept_text_and_stops_generating(server, monkeypatch, stream):
    """`tokens` and `tokens_predicted` are the fewest ids whose text holds the kept content (they were the whole
    reply's: 50 whole, 20 streamed), and the request is ended at the cut as at a stop string (whole, it ran on)."""
    state = server.state
    cancels = script(monkeypatch, state, REPLY)
    body = {"prompt": "def f():\n", "n_predict": 64, "return_tokens": True, "n_indent": 4, "stream": stream}
    r = httpx.post(server.base_url + "/completion", json=body, timeout=120)
    if stream:
        chunks = events(r)
        final, content, tokens = chunks[-1], "".join(c["content"] for c in chunks), [t for c in chunks
                                                                                      for t in c["tokens"]]
    else:
        final = r.json()
        content, tokens = final["content"], final["tokens"]
    assert content == "x = 1\n    y = 2" and final["stop_type"] == "limit" and final["stopping_word"] == ""
    assert state.tokenizer.decode(tokens) == content
    assert final["tokens_predicted"] == final["timings"]["predicted_n"] == len(tokens)
    assert [why for _, why in cancels] == ["stop"]  # generation ends at the cut, as a finished reply


def test_n_indent_cut_before_a_stop_string_is_a_limit(server, monkeypatch):
    """A stop string after the n_indent cut is not what ended the kept text: stop_type limit, no stopping_word."""
    script(monkeypatch, server.state, REPLY)
    r = httpx.post(server.base_url + "/completion", timeout=120, json={
        "prompt": "def f():\n", "n_predict": 64, "return_tokens": True, "n_indent": 4, "stop": ["w = 4"]}).json()
    assert r["content"] == "x = 1\n    y = 2" and r["stop_type"] == "limit" and r["stopping_word"] == ""
    assert server.state.tokenizer.decode(r["tokens"]) == r["content"]


def test_infill_n_indent_cut_keeps_the_ids_of_the_kept_middle(server, monkeypatch):
    """/infill's chosen middle cut by n_indent: `tokens` are the ids of the kept text, not the whole middle's."""
    from types import SimpleNamespace

    import canvaslm.server.infill as server_infill

    state = server.state
    middle = state.tokenizer.encode(REPLY, add_special_tokens=False)
    chosen = SimpleNamespace(cached_tokens=0, prompt_seconds=0.0, request=SimpleNamespace(params=state.defaults,
                                                                                          seed=1))

    async def run_infill(*args, **kwargs):  # the candidates' run, as its chosen middle
        return [SimpleNamespace(middle=middle, candidates=[chosen], best=0)]

    monkeypatch.setattr(server_infill, "run_infill", run_infill)
    r = httpx.post(server.base_url + "/infill", timeout=120, json={
        "input_prefix": "def f():\n", "input_suffix": "\nreturn x\n", "n_predict": 64, "return_tokens": True,
        "n_indent": 4, "stop": ["w = 4"]}).json()
    assert r["content"] == "x = 1\n    y = 2" and r["stop_type"] == "limit" and r["stopping_word"] == ""
    assert r["tokens_predicted"] == len(r["tokens"]) and state.tokenizer.decode(r["tokens"]) == r["content"]


def test_without_n_indent_the_ids_are_the_whole_reply(server, monkeypatch):
    state = server.state
    for stream in (False, True):
        script(monkeypatch, state, REPLY)
        r = httpx.post(server.base_url + "/completion", timeout=120, json={
            "prompt": "def f():\n", "n_predict": 64, "return_tokens": True, "stream": stream})
        tokens = [t for c in events(r) for t in c["tokens"]] if stream else r.json()["tokens"]
        assert tokens == state.tokenizer.encode(REPLY, add_special_tokens=False) + [state.tokenizer.eos_ids[0]]


def test_fewest_ids(server):
    from canvaslm.server.llamacpp import fewest_ids

    tok = server.state.tokenizer
    ids = tok.encode(REPLY, add_special_tokens=False)
    for n in (0, 1, 7, len(ids)):
        text = tok.decode(ids[:n])
        assert fewest_ids(tok.decode, ids, text) == ids[:n]
    assert fewest_ids(tok.decode, ids, "x = 1\n") == ids[:len(tok.encode("x = 1\n", add_special_tokens=False))]


# --- Ollama: keep_alive 0 unloads --------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_alive,reason", [(0, "unload"), ("0", "unload"), ("0s", "unload"), (0.0, "unload"),
                                               (None, "load"), ("5m", "load"), (-1, "load"), (300, "load")])
def test_an_empty_request_with_keep_alive_0_answers_unload(server, keep_alive, reason):
    """As Ollama's docs/api.md ("Unload a model"): an empty request with keep_alive 0 answers done_reason
    "unload" (here nothing is unloaded), without it "load"."""
    extra = {} if keep_alive is None else {"keep_alive": keep_alive}
    chat = httpx.post(server.base_url + "/api/chat", json={"model": MODEL, "messages": [], **extra}, timeout=60)
    gen = httpx.post(server.base_url + "/api/generate", json={"model": MODEL, **extra}, timeout=60)
    assert chat.json()["done_reason"] == gen.json()["done_reason"] == reason


def test_text_between_and_after_calls_keeps_its_place(server, monkeypatch):
    """Text the model writes after a complete call (between two calls, or after the last) is a text block where it
    was written, whole and streamed, not joined to the text before the first call; the chat route's content keeps
    all of the text, as before. White space between calls is no block."""
    whole, reason, streamed, stream_reason = messages(
        server, monkeypatch, "Let me check." + CALL + "\n" + CALL + "Then Bergen." + CALL + "Done.", "stop")
    call = {"type": "tool_use", "name": "get_weather", "input": {"city": "Oslo"}}
    assert reason == stream_reason == "tool_use"
    assert whole == streamed == [{"type": "text", "text": "Let me check."}, call, call,
                                 {"type": "text", "text": "Then Bergen."}, call, {"type": "text", "text": "Done."}]
