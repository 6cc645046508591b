"""Anthropic's Messages API (server/anthropic.py) where it answered otherwise than its own terms promise: advice
given in OpenAI's tool_choice words, errors that named the wrong problem, thinking asked of a model that cannot
think, and an empty reply that was [] whole but [text ""] streamed."""

from __future__ import annotations

import json

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")

from canvaslm.engine.engine import Commit, EngineConfig, Finish  # noqa: E402
from canvaslm.server.launch import BackgroundServer, build_state  # noqa: E402

MODEL = "tiny"
ASK = [{"role": "user", "content": "x"}]
WEATHER = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def server(translated_api_server):
    return translated_api_server


def refusal(server, body: dict) -> dict:
    r = httpx.post(server.base_url + "/v1/messages", json={"model": MODEL, "max_tokens": 8, **body}, timeout=120)
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    return r.json()["error"]


def test_tools_without_call_tokens_get_advice_in_anthropic_terms(server):
    """What Claude Code sends (tools, no tool_choice) on a model with no tool-call tokens: the advice names
    tool_choice values this route takes, and following it works."""
    message = refusal(server, {"messages": ASK, "tools": [WEATHER]})["message"]
    assert '{"type": "any"}' in message and '{"type": "tool", "name": ...}' in message and '{"type": "none"}' in message
    assert "'required'" not in message and "function" not in message
    assert refusal(server, {"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "auto"}})["message"] == message
    a = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}, {"type": "none"}):
        msg = a.messages.create(model=MODEL, max_tokens=40, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                extra_body={"seed": 1})
        assert msg.stop_reason in ("tool_use", "end_turn", "max_tokens")


@pytest.mark.parametrize("body,needle", [
    ({"messages": ASK, "tools": [{"name": "get_weather"}]}, "tools[0].input_schema is required"),
    ({"messages": ASK, "tools": [WEATHER, {"name": "f", "type": "custom"}]}, "tools[1].input_schema is required"),
    ({"messages": ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools[0]: 'web_search' is a server tool (web_search_20250305)"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text must be a string, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text must be a string, got no text field"),
    ({"messages": ASK, "system": [{"type": "text"}]}, "system[0].text must be a string, got no text field"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "text", "text": None}]}]}]}, "messages[0].content[0].content[0].text must be a string, got null"),
    ({"messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}},
     "thinking: 'tiny' does not support thinking"),
])
def test_errors_name_the_problem(server, body, needle):
    assert needle in refusal(server, body)["message"]


def test_thinking_off_or_adaptive_runs_on_a_model_that_cannot_think(server):
    """Only thinking asked for outright is refused; "adaptive" leaves it to the model, which here has no thought."""
    a = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    for thinking in ({"type": "disabled"}, {"type": "adaptive"}):
        msg = a.messages.create(model=MODEL, max_tokens=4, messages=ASK, thinking=thinking)
        assert all(b.type == "text" for b in msg.content)
    assert a.messages.count_tokens(model=MODEL, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024}
                                   ).input_tokens > 0  # counting runs nothing


def _script_empty(monkeypatch, state):
    """state.engine answers every request with EOS alone: an empty reply."""
    eos = state.tokenizer.eos_ids[0]

    def submit(request, queue, loop, *rest):
        loop.call_soon_threadsafe(queue.put_nowait, Commit(request.request_id, 0, (eos,)))
        loop.call_soon_threadsafe(queue.put_nowait, Finish(request.request_id, "stop", 1, 1))

    monkeypatch.setattr(state.engine, "submit", submit)


def test_an_empty_reply_has_no_content_block_whole_or_streamed(server, monkeypatch):
    """As Anthropic's own: content [] and, streamed, message_start then message_delta with no block between."""
    _script_empty(monkeypatch, server.state)
    a = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    kw = dict(model=MODEL, max_tokens=8, messages=ASK)
    whole = a.messages.create(**kw)
    with a.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    assert whole.content == streamed.content == [] and whole.stop_reason == streamed.stop_reason == "end_turn"
    with httpx.stream("POST", server.base_url + "/v1/messages", json={**kw, "stream": True}) as r:
        kinds = [json.loads(line[6:])["type"] for line in r.iter_lines() if line.startswith("data: ")]
    assert kinds == ["message_start", "message_delta", "message_stop"]


def test_thinking_runs_with_the_reasoning_parser_off(tmp_path):
    """--reasoning-parser none leaves the thought in the text; the model still thinks, so thinking is not refused."""
    from canvaslm.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN
    from canvaslm.testing import make_tiny_checkpoint

    state = build_state(make_tiny_checkpoint(tmp_path / "think", extra_specials=(CHANNEL_OPEN, CHANNEL_CLOSE)),
                        "cpu", "float32", EngineConfig(max_batch=2, max_model_len=256), served_model_name=MODEL)
    state.reasoning = False
    with BackgroundServer(state) as srv:
        a = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0)
        msg = a.messages.create(model=MODEL, max_tokens=2, messages=ASK, thinking={"type": "enabled",
                                                                                   "budget_tokens": 1024})
        assert all(b.type == "text" for b in msg.content)
