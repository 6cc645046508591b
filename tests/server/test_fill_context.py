"""Without max_tokens an output with no constraint runs until EOS or the context is full, as vLLM serves
DiffusionGemma (it ignores the checkpoint's 256-token generation default), Ollama (num_predict -1, its default;
-2) and llama-server (n_predict -1, its default). A length set by flag (`--diffusion-config
'{"max_new_tokens": N}'`) is the default instead, except where a request asks for -1 / -2. A constrained output
keeps the width it has without max_tokens. The engine is scripted, recording each request's budget."""

from __future__ import annotations

import argparse

import httpx
import pytest

from canvaslm.testing import script_engine

from .conftest import MODEL

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def budgets(translated_api_server, monkeypatch):
    """-> (server, the list each request's (prompt length, max_new_tokens) goes to)."""
    state = translated_api_server.state
    script_engine(monkeypatch, state, "ok")
    scripted, seen = state.engine.submit, []

    def submit(request, queue, loop):
        seen.append((len(request.prompt_ids), request.params.max_new_tokens))
        scripted(request, queue, loop)

    monkeypatch.setattr(state.engine, "submit", submit)
    return translated_api_server, seen


def room(srv, prompt_len: int) -> int:
    C = srv.state.canvas_length
    return (srv.state.max_model_len - prompt_len) // C * C


def post(srv, path: str, body: dict) -> dict:
    r = httpx.post(srv.base_url + path, json={"model": MODEL, "stream": False, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("options", [{}, {"num_predict": -1}, {"num_predict": -2}])
def test_without_a_length_every_route_fills_the_context(budgets, options):
    srv, seen = budgets
    post(srv, "/api/chat", {"messages": CHAT, "options": options})
    post(srv, "/api/generate", {"prompt": "hi", "options": options})
    post(srv, "/api/generate", {"prompt": "hi", "raw": True, "options": options})
    post(srv, "/v1/chat/completions", {"messages": CHAT})
    post(srv, "/v1/completions", {"prompt": "hi"})
    post(srv, "/v1/responses", {"input": "hi"})
    post(srv, "/completion", {"prompt": "hi"})
    assert len(seen) == 7 and all(n == room(srv, p) for p, n in seen)
    assert all(n > srv.state.defaults.max_new_tokens for _, n in seen)


def test_a_length_or_a_format_keeps_its_own(budgets):
    srv, seen = budgets
    post(srv, "/api/generate", {"prompt": "hi", "options": {"num_predict": 8}})
    post(srv, "/completion", {"prompt": "hi", "n_predict": 8})
    post(srv, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8})
    post(srv, "/api/generate", {"prompt": "hi", "format": "json"})  # a constrained output: as wide as on /v1
    post(srv, "/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}})
    assert [n for _, n in seen] == [8, 8, 8, seen[4][1], seen[4][1]]
    assert seen[3][1] < room(srv, seen[3][0])


def test_a_default_length_set_by_flag_holds_unless_a_request_asks_for_the_context(budgets, monkeypatch):
    from canvaslm.server.vllm_compat import add_vllm_args, apply_chat_flags

    srv, seen = budgets
    parser = argparse.ArgumentParser()
    add_vllm_args(parser)
    args = parser.parse_args(["--diffusion-config", '{"max_new_tokens": 32}'])
    for name in ("reasoning", "thinking_token_budget", "fill_context"):
        monkeypatch.setattr(srv.state, name, getattr(srv.state, name))  # put back after the test
    monkeypatch.setattr(srv.state, "defaults", srv.state.defaults.replace(max_new_tokens=32))
    notes = apply_chat_flags(srv.state, args)
    assert srv.state.fill_context is False and any("at most 32 new tokens" in n for n in notes)
    post(srv, "/v1/chat/completions", {"messages": CHAT})
    post(srv, "/api/chat", {"messages": CHAT})
    post(srv, "/api/chat", {"messages": CHAT, "options": {"num_predict": -1}})
    post(srv, "/completion", {"prompt": "hi"})  # llama-server's default n_predict is -1
    assert [n for _, n in seen][:2] == [32, 32] and [n for _, n in seen][2:] == [room(srv, p) for p, _ in seen[2:]]
    show = httpx.post(srv.base_url + "/api/show", json={"model": MODEL}).json()["parameters"]
    assert "num_predict 32" in show


def test_the_reported_defaults_say_so(translated_api_server):
    srv = translated_api_server
    props = httpx.get(srv.base_url + "/props").json()["default_generation_settings"]["params"]
    assert props["n_predict"] == -1  # what a request without n_predict gets, as llama-server reports it
    show = httpx.post(srv.base_url + "/api/show", json={"model": MODEL}).json()["parameters"]
    assert "num_predict -1" in show
