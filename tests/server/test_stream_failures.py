"""A stream whose headers are sent and that then fails on something other than an APIError (a bug, an
unexpected exception) reports it in-band in each dialect, as the 500 an unstreamed request would get, and
ends the way the dialect ends (OpenAI's [DONE]); the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from canvaslm.server import serving

from .conftest import MODEL

MSG = [{"role": "user", "content": "hi"}]
ROUTES = {  # route -> (streamed body, how its last lines must read)
    "/v1/chat/completions": {"model": MODEL, "messages": MSG, "max_tokens": 8, "stream": True},
    "/v1/completions": {"model": MODEL, "prompt": "abc", "max_tokens": 8, "stream": True},
    "/v1/responses": {"model": MODEL, "input": "abc", "max_output_tokens": 8, "stream": True},
    "/v1/messages": {"model": MODEL, "messages": MSG, "max_tokens": 8, "stream": True},
    "/api/generate": {"model": MODEL, "prompt": "abc", "options": {"num_predict": 8}},
    "/completion": {"prompt": "abc", "n_predict": 8, "stream": True},
}


def lines(base, route, body) -> tuple[int, list[str]]:
    with httpx.stream("POST", base + route, json=body, timeout=120) as r:
        return r.status_code, [x for x in r.iter_lines() if x]


@pytest.mark.parametrize("route", list(ROUTES))
def test_an_unexpected_failure_mid_stream_is_reported_in_band(translated_api_server, monkeypatch, route):
    base = translated_api_server.base_url

    def broken(self, ids):
        raise RuntimeError("tracker broke")

    monkeypatch.setattr(serving.TextTracker, "add", broken)
    status, got = lines(base, route, ROUTES[route])
    assert status == 200  # the headers went out before the failure
    text = "\n".join(got)
    assert "internal error: RuntimeError: tracker broke" in text, text
    if route in ("/v1/chat/completions", "/v1/completions"):
        assert got[-1] == "data: [DONE]"
        assert json.loads(got[-2][len("data: "):])["error"]["type"] == "server_error"
    elif route == "/v1/messages":
        assert got[-2] == "event: error" and json.loads(got[-1][len("data: "):])["type"] == "error"
    elif route == "/v1/responses":
        assert json.loads(got[-1][len("data: "):])["type"] == "error"
    elif route == "/api/generate":
        assert "error" in json.loads(got[-1])
    else:
        assert json.loads(got[-1][len("data: "):])["error"]["type"] == "server_error"
    monkeypatch.undo()  # the server keeps serving, with every slot back
    ok = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 4, "seed": 1},
                    timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
