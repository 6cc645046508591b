"""Ollama's num_predict -1 (its default) and -2, and llama-server's n_predict -1 (its default): an output with no
constraint runs until EOS or the context is full, as those servers' are, not to the checkpoint's default length.
The OpenAI routes keep the checkpoint's default. The engine is scripted, recording each request's budget."""

from __future__ import annotations

import httpx
import pytest

from canvaslm.testing import script_engine

from .conftest import MODEL


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
def test_ollama_without_a_length_fills_the_context(budgets, options):
    srv, seen = budgets
    msgs = [{"role": "user", "content": "hi"}]
    post(srv, "/api/chat", {"messages": msgs, "options": options})
    post(srv, "/api/generate", {"prompt": "hi", "options": options})
    post(srv, "/api/generate", {"prompt": "hi", "raw": True, "options": options})
    assert len(seen) == 3 and all(n == room(srv, p) for p, n in seen)
    assert all(n > srv.state.defaults.max_new_tokens for _, n in seen)


def test_ollama_num_predict_and_a_format_keep_their_lengths(budgets):
    srv, seen = budgets
    msgs = [{"role": "user", "content": "hi"}]
    post(srv, "/api/generate", {"prompt": "hi", "options": {"num_predict": 8}})
    post(srv, "/api/generate", {"prompt": "hi", "format": "json"})  # a constrained output: as wide as on /v1
    post(srv, "/v1/chat/completions", {"messages": msgs, "response_format": {"type": "json_object"}})
    post(srv, "/v1/chat/completions", {"messages": msgs})  # OpenAI's route: the checkpoint's default
    assert [n for _, n in seen] == [8, seen[2][1], seen[2][1], srv.state.defaults.max_new_tokens]
    assert seen[1][1] < room(srv, seen[1][0])


def test_llama_server_n_predict_minus_one_fills_the_context(budgets):
    srv, seen = budgets
    post(srv, "/completion", {"prompt": "hi"})
    post(srv, "/completion", {"prompt": "hi", "n_predict": -1})
    post(srv, "/completion", {"prompt": "hi", "n_predict": 8})
    assert [n for _, n in seen] == [room(srv, seen[0][0])] * 2 + [8]
    props = httpx.get(srv.base_url + "/props").json()["default_generation_settings"]["params"]
    assert props["n_predict"] == -1  # what a request without n_predict gets, as llama-server reports it
